"""Attention kernels behind one function: torch SDPA (every device), flash-attn and Transformer Engine (GPU).

All backends compute the same thing, causal softmax attention in the layout ``[batch, seq, heads, head_dim]``
with grouped-query key/value heads, optionally restricted to documents (``segment_ids``). SDPA is the
reference and the CPU path; the GPU libraries are imported only when chosen, so they stay optional.

``--attention-backend``:

* ``auto`` (default): flash-attn when it is installed and the tensors are CUDA fp16/bf16, else Transformer
  Engine when installed and the tensors are on CUDA, else SDPA. Decided per call from the tensors.
* ``flash`` / ``te`` / ``sdpa``: that backend; :func:`check_attention_backend` refuses at start a backend that
  cannot run (not installed, CPU tensors, fp32 for flash-attn), naming what is missing.

flash-attn treats each run of equal ``segment_ids`` in a row as one document (varlen kernel): packed samples
from GPTDataset have exactly that shape. SDPA and Transformer Engine use the dense document mask.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megalign.config.model import ATTENTION_BACKENDS
from megalign.errors import ConfigError

__all__ = [
    "ATTENTION_BACKENDS",
    "check_attention_backend",
    "cumulative_document_lengths",
    "document_causal_mask",
    "dot_product_attention",
    "resolve_attention_backend",
]

_HALF = (torch.float16, torch.bfloat16)


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
    if backend == "sdpa":
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
    if requested != "auto":
        return requested
    for backend in ("flash", "te"):
        if _unavailable(backend, device, dtype) is None:
            return backend
    return "sdpa"


def check_attention_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``requested`` and raise ConfigError (at start, not mid-run) when it cannot run here."""
    backend = resolve_attention_backend(requested, device, dtype)
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


_KERNELS: Dict[str, Callable[..., torch.Tensor]] = {"sdpa": _sdpa, "flash": _flash, "te": _te}


def dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: Optional[torch.Tensor] = None, backend: str = "auto"
) -> torch.Tensor:
    """Causal ``softmax(q kᵀ / sqrt(head_dim)) v`` of ``[batch, seq, heads, head_dim]`` tensors with ``backend``.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: each key/value head serves
    ``q_heads / kv_heads`` consecutive query heads). With ``segment_ids`` ``[batch, seq]`` a position
    attends only to earlier positions of its own document. Returns ``q``'s shape.
    """
    return _KERNELS[resolve_attention_backend(backend, q.device, q.dtype)](q, k, v, segment_ids)
