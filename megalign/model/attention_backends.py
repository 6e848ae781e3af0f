"""Attention kernels behind one function: torch SDPA (every device), flash-attn and Transformer Engine (GPU).

All backends compute the same thing, causal softmax attention in the layout ``[batch, seq, heads, head_dim]``
with grouped-query key/value heads, optionally restricted to documents (``segment_ids``). SDPA is the
reference and the CPU path; the GPU libraries are imported only when chosen, so they stay optional.

``--attention-backend``:

* ``auto`` (default): flash-attn when it is installed and the tensors are CUDA fp16/bf16, else Transformer
  Engine when installed and the tensors are on CUDA, else SDPA. Decided per call from the tensors.
* ``flash`` / ``te`` / ``sdpa``: that backend; :func:`check_attention_backend` refuses at start a backend that
  cannot run (not installed, CPU tensors, fp32 for flash-attn), naming what is missing.
* Megatron's names: ``fused`` is Transformer Engine where it can run, else SDPA (one warning line at start);
  ``unfused`` and ``local`` are the explicit ``softmax(q kᵀ / sqrt(d)) v`` in PyTorch (``math``), the kernel
  that also runs whenever attention dropout is active in training (its mask must be drawn per head from a
  seed, identically at any tensor-parallel size; the fused kernels draw their own).

flash-attn treats each run of equal ``segment_ids`` in a row as one document (varlen kernel): packed samples
from GPTDataset have exactly that shape. SDPA and Transformer Engine use the dense document mask.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megalign.config.model import ATTENTION_BACKENDS
from megalign.errors import ConfigError

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionDropout",
    "check_attention_backend",
    "cumulative_document_lengths",
    "document_causal_mask",
    "dot_product_attention",
    "mix_seed",
    "resolve_attention_backend",
]

_HALF = (torch.float16, torch.bfloat16)
_MEGATRON_NAMES = {"unfused": "math", "local": "math"}
logger = logging.getLogger(__name__)
_WARNED: Dict[str, bool] = {}


def mix_seed(seed: int, *values: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``values`` (layer, site, head, ...): equal inputs, equal seed."""
    for value in values:
        seed = (seed * 1_000_003 + value + 0x9E3779B9) % (2**63)
    return seed


@dataclass(frozen=True)
class AttentionDropout:
    """Dropout on the attention probabilities: probability ``p``; the mask of global query head ``h`` is drawn from
    ``mix_seed(seed, h)``, so a tensor-parallel rank holding heads ``first_head..`` draws what one process would."""

    p: float
    seed: int
    first_head: int = 0

    def keep_mask(self, shape: Tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        """Float mask ``[batch, heads, seq, keys]`` of 0 (dropped) and ``1 / (1 - p)`` (kept)."""
        batch, heads, seq, keys = shape
        masks = []
        for head in range(heads):
            generator = torch.Generator(device=device)
            generator.manual_seed(mix_seed(self.seed, self.first_head + head))
            keep = torch.empty(batch, seq, keys, device=device).bernoulli_(1.0 - self.p, generator=generator)
            masks.append(keep)
        return torch.stack(masks, dim=1) / (1.0 - self.p)


_MODULES: Dict[str, Optional[Any]] = {}  # import attempts (a plain dict: torch.compile traces through it)
_TE_MODULES: Dict[Tuple[int, int, int, str], torch.nn.Module] = {}


def _import(module: str) -> Optional[Any]:
    """The module if it imports, else None (cached: a failed import is not retried every layer)."""
    if module not in _MODULES:
        try:
            _MODULES[module] = importlib.import_module(module)
        except ImportError:
            _MODULES[module] = None
    return _MODULES[module]


def _flash_attn() -> Optional[Any]:
    return _import("flash_attn")


def _transformer_engine() -> Optional[Any]:
    return _import("transformer_engine.pytorch")


def _unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``/``dtype`` tensors, or None when it can."""
    if backend in ("sdpa", "math"):
        return None
    package = {"flash": ("flash-attn", _flash_attn), "te": ("transformer-engine", _transformer_engine)}[backend]
    if package[1]() is None:
        return f"the {package[0]} package is not installed (pip install {package[0]})"
    if device.type != "cuda":
        return f"it needs CUDA tensors, these are on {device.type}"
    if backend == "flash" and dtype not in _HALF:
        return f"flash-attn needs fp16 or bf16 tensors, these are {dtype} (train with --bf16 or --fp16)"
    return None


def resolve_attention_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for ``requested`` on tensors of ``device`` and ``dtype`` (``auto`` picks the fastest)."""
    if requested not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend {requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if requested in _MEGATRON_NAMES:
        return _MEGATRON_NAMES[requested]
    if requested == "fused":
        return "te" if _unavailable("te", device, dtype) is None else "sdpa"
    if requested != "auto":
        return requested
    for backend in ("flash", "te"):
        if _unavailable(backend, device, dtype) is None:
            return backend
    return "sdpa"


def check_attention_backend(requested: str, device: torch.device, dtype: torch.dtype, warn: bool = True) -> str:
    """Resolve ``requested`` and raise ConfigError (at start, not mid-run) when it cannot run here.

    ``warn``: log the fused-to-SDPA fallback (a parallel job passes it on one rank only: one line per job)."""
    backend = resolve_attention_backend(requested, device, dtype)
    if warn and requested == "fused" and backend == "sdpa" and not _WARNED.get("fused"):
        _WARNED["fused"] = True
        logger.warning(
            "--attention-backend fused: Transformer Engine cannot run here (%s); using torch SDPA",
            _unavailable("te", device, dtype),
        )
    reason = _unavailable(backend, device, dtype)
    if reason is not None:
        raise ConfigError(
            f"--attention-backend {requested}: cannot be used because {reason}; use "
            "--attention-backend auto to fall back to torch SDPA"
        )
    return backend


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[batch, 1, seq, seq]``, True where query ``i`` may attend to key ``j``:
    ``j <= i`` and both positions are in the same document (equal segment ids)."""
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril_()
    same_document = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same_document & causal).unsqueeze(1)


def cumulative_document_lengths(segment_ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """flash-attn's varlen description of ``segment_ids`` ``[batch, seq]`` flattened row after row.

    Returns ``(cu_seqlens, max_seqlen)``: int32 offsets ``[0, end_1, end_2, ..., batch * seq]`` where a new
    document starts at every change of segment id and at every row start, and the longest document.
    """
    batch, seq = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    positions = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([batch * seq], device=segment_ids.device, dtype=positions.dtype)
    cu_seqlens = torch.cat([positions, total]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [batch, heads, seq, head_dim]
    gqa = q.shape[1] != k.shape[1]
    if segment_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(segment_ids), enable_gqa=gqa)
    return out.transpose(1, 2)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    flash_attn = _flash_attn()
    assert flash_attn is not None  # the backend was resolved or checked as available
    if segment_ids is None:  # flash-attn takes [batch, seq, heads, dim] and fewer k/v heads (GQA) as they are
        return flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, causal=True)
    batch, seq = segment_ids.shape
    cu_seqlens, max_seqlen = cumulative_document_lengths(segment_ids)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(batch * seq, *q.shape[2:]),
        k.reshape(batch * seq, *k.shape[2:]),
        v.reshape(batch * seq, *v.shape[2:]),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=0.0,
        causal=True,
    )
    return out.reshape(q.shape)


def _te_module(heads: int, kv_heads: int, head_dim: int, mask_type: str) -> torch.nn.Module:
    """One Transformer Engine DotProductAttention per shape and mask kind (it holds no weights)."""
    key = (heads, kv_heads, head_dim, mask_type)
    if key not in _TE_MODULES:
        te = _transformer_engine()
        assert te is not None  # the backend was resolved or checked as available
        _TE_MODULES[key] = te.DotProductAttention(
            heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0, qkv_format="bshd", attn_mask_type=mask_type
        )
    return _TE_MODULES[key]


def _te(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    heads, head_dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    if segment_ids is None:
        out = _te_module(heads, kv_heads, head_dim, "causal")(q, k, v)
    else:  # Transformer Engine's "arbitrary" masks mark the positions to EXCLUDE with True
        out = _te_module(heads, kv_heads, head_dim, "arbitrary")(
            q, k, v, attention_mask=~document_causal_mask(segment_ids)
        )
    return out.reshape(q.shape)


def _math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: Optional[torch.Tensor],
    dropout: Optional[AttentionDropout] = None,
) -> torch.Tensor:
    """The explicit kernel: scores in fp32, causal (document) mask, softmax, optional dropout, weighted values."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    if k.shape[1] != q.shape[1]:  # grouped-query heads: each k/v head serves consecutive query heads
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    seq = q.shape[2]
    if segment_ids is None:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril_()
    else:
        allowed = document_causal_mask(segment_ids)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    if dropout is not None:
        probs = probs * dropout.keep_mask(tuple(probs.shape), probs.device)  # type: ignore[arg-type]
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2)


_KERNELS: Dict[str, Callable[..., torch.Tensor]] = {"sdpa": _sdpa, "flash": _flash, "te": _te, "math": _math}


def dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    backend: str = "auto",
    dropout: Optional[AttentionDropout] = None,
) -> torch.Tensor:
    """Causal ``softmax(q kᵀ / sqrt(head_dim)) v`` of ``[batch, seq, heads, head_dim]`` tensors with ``backend``.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: each key/value head serves
    ``q_heads / kv_heads`` consecutive query heads). With ``segment_ids`` ``[batch, seq]`` a position
    attends only to earlier positions of its own document. With ``dropout`` the explicit kernel runs whatever
    ``backend`` says (see :class:`AttentionDropout`). Returns ``q``'s shape.
    """
    if dropout is not None:
        return _math(q, k, v, segment_ids, dropout)
    return _KERNELS[resolve_attention_backend(backend, q.device, q.dtype)](q, k, v, segment_ids)
