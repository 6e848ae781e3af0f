"""Inference-only forward pass of a whole GPTModel for :class:`~megalign.inference.generation.Generator`.

The model's own cached path (``GPTModel(..., kv_cache=KVCache)``) is general (pipeline stages, tensor
parallel shards, several new tokens per row) and pays for it in small operations: on a CPU each op costs
~2-20 us of dispatch, as much as the matmuls of a small model's decode step. :class:`FastDecoder` computes
the same function with fewer and faster ops, reading the model's weights (it never changes the model, its
training path or its checkpoints):

* the matmul weights copied once, transposed to ``[in, out]`` (CPU matmuls with a row-major right operand
  run up to 2x faster than ``F.linear``'s ``x @ W.T``), with q/k/v and gate/up concatenated into one matmul
  each. Only when the copies take at most ``copy_limit_bytes`` (default 1 GiB, :func:`copied_weight_bytes`):
  small models, where this matters; a large model uses its weights in place (one matmul per projection)
  rather than doubling them in memory. The copies are made once per model and rebuilt when a parameter
  changes (:meth:`FastDecoder.for_model` compares data pointers and version counters);
* the residual adds fused into the o/down matmuls (``addmm``); RMSNorm without dtype casts in fp32;
* rotary tables for all positions computed once; queries and keys rotated together, with one ``flip``;
* the keys of all layers in one cache tensor, stored transposed (``[.., head_dim, length]``: the decode
  step's ``q @ keys`` then multiplies row-major operands), the values in another, with an additive padding
  mask built once at prefill: a decode step's mask is a view, and dropping finished rows is one
  ``index_select`` each;
* a decode step attends with the query heads of a key/value head as one group of rows (``baddbmm`` of the
  mask and the scaled scores; softmax; ``bmm``), so grouped-query attention needs no repeated keys.

Numerics: the logits differ from the model's cached forward by float rounding only (another attention
kernel for decode steps, another matmul operand layout; ~1e-7 relative in fp32), which
``tests/unit/test_generation.py`` bounds; greedy output equals transformers' ``generate()`` there and in
``benchmarks/generate.py``. Other dtypes follow the reference ops' casts (RMSNorm and rotary in fp32).

Batches are left-padded (all rows write the same cache slot); ``valid`` marks the real prompt tokens, and
padding is kept out of attention exactly as :class:`~megalign.model.kv_cache.KVCache` does (a real
token never sees padding, a padding slot sees only padding).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F

from megalign.model.kv_cache import KVCache
from megalign.ops import rms_norm, rotary_cos_sin

if TYPE_CHECKING:
    from megalign.model.decoder import DecoderLayer, GPTModel
    from megalign.parallel import ColumnParallelLinear, RowParallelLinear

__all__ = ["DecodeState", "FastDecoder", "ModelDecoder", "copied_weight_bytes"]

DEFAULT_COPY_LIMIT_BYTES = 1 << 30

_Matmul = List[Tuple[torch.Tensor, Optional[torch.Tensor]]]  # (weight [in, out], bias) pieces, outputs concatenated


class _Layer(NamedTuple):
    """One decoder layer's norm weights and matmul weights ``[in, out]`` (see :func:`_matmul`)."""

    input_norm: torch.Tensor
    qkv: _Matmul
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: _Matmul
    down: torch.Tensor


def _matmul(x: torch.Tensor, pieces: _Matmul) -> torch.Tensor:
    """``x`` ``[rows, in]`` times the pieces' weights, their outputs side by side (one matmul when fused)."""
    if len(pieces) == 1:
        weight, bias = pieces[0]
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return torch.cat([torch.mm(x, w) if b is None else torch.addmm(b, x, w) for w, b in pieces], dim=-1)


class DecodeState:
    """The cache of one batch being decoded: the keys of every layer, transposed, ``[layers, batch, kv_heads,
    head_dim, capacity]`` (so a decode step's ``q @ keys`` multiplies row-major operands), the values
    ``[layers, batch, kv_heads, capacity, head_dim]``, the additive mask of the cached slots ``[batch,
    kv_heads, 1, capacity]`` (0: a real token, -inf: padding; the same for every key/value head), the next
    write offset ``length`` and each row's next position id ``[batch, 1]``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.mask, self.positions = keys, values, mask, positions
        self.length = 0

    @property
    def batch_size(self) -> int:
        """Rows currently held."""
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        """Slots per row (prompt width + tokens that may be generated)."""
        return self.mask.shape[-1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch, in the new order), e.g. the unfinished ones."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        self.mask = self.mask.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)


def _fingerprint(model: torch.nn.Module) -> Optional[Tuple[Tuple[int, int], ...]]:
    """(data pointer, version) of every parameter, or None when they do not track versions (inference tensors)."""
    try:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:
        return None


def _linears(model: GPTModel) -> Iterator[Tuple[str, Union[ColumnParallelLinear, RowParallelLinear]]]:
    for index in model.stage.layers:
        layer = model.decoder_layer(index)
        attention, mlp = layer.attention, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"layers.{index}.attention.{name}", getattr(attention, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"layers.{index}.mlp.{name}", getattr(mlp, name)


def _head_weight(model: GPTModel) -> torch.Tensor:
    """The LM head's weight ``[vocab, hidden]``: its own, or the embedding table when tied."""
    if model.lm_head is not None:
        return model.lm_head.weight
    assert model.embed_tokens is not None  # a tied LM head's stage holds the embedding table
    return model.embed_tokens.weight


def copied_weight_bytes(model: GPTModel, vocab_size: int) -> int:
    """Bytes of the fused, transposed weight copies a :class:`FastDecoder` of ``model`` makes: every
    projection and the LM head's first ``vocab_size`` rows."""
    total = sum(linear.weight.numel() * linear.weight.element_size() for _, linear in _linears(model))
    head = _head_weight(model)
    return total + vocab_size * head.shape[1] * head.element_size()


# the decoder last built for each live model: its weight copies are made once, not once per Generator
_BUILT: "weakref.WeakKeyDictionary[GPTModel, FastDecoder]" = weakref.WeakKeyDictionary()


class FastDecoder:
    """Prefill and one-token decode steps of ``model`` (a whole GPTModel, tensor parallel size 1), returning
    the logits of the first ``vocab_size`` ids at each row's last position (see module doc).

    ``copy_limit_bytes``: make fused, transposed copies of the matmul weights when they take at most this
    (:func:`copied_weight_bytes`); else use the model's weights in place, one matmul per projection.
    """

    def __init__(
        self, model: GPTModel, vocab_size: int, max_length: int, copy_limit_bytes: int = DEFAULT_COPY_LIMIT_BYTES
    ) -> None:
        config, embed_tokens, final_norm = model.config, model.embed_tokens, model.final_norm
        assert embed_tokens is not None and final_norm is not None  # a whole model: first and last stage
        self.vocab_size, self.max_length = vocab_size, max_length  # no reference to model: see _BUILT
        self.eps, self.head_dim = config.rms_norm_eps, config.head_dim
        first = model.decoder_layer(model.stage.layers[0]).attention
        self.num_heads, self.num_kv_heads = first.num_heads, first.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.copied = copied_weight_bytes(model, vocab_size) <= copy_limit_bytes
        self.fingerprint = _fingerprint(model)
        self.dtype, self.device = embed_tokens.weight.dtype, embed_tokens.weight.device
        with torch.no_grad():
            self.embedding = embed_tokens.weight
            self.layers = [self._layer(model.decoder_layer(i)) for i in model.stage.layers]
            self.final_norm = final_norm.weight
            self.lm_head = self._transposed(_head_weight(model)[:vocab_size])
        self._rope = (config.rope_theta, config.rope_scaling)
        self.cos = self.sin = torch.empty(0, self.head_dim)

    @classmethod
    def for_model(
        cls, model: GPTModel, vocab_size: int, max_length: int, copy_limit_bytes: int = DEFAULT_COPY_LIMIT_BYTES
    ) -> "FastDecoder":
        """A decoder of ``model``: the one last built for it (by any Generator) while the model's weights and
        these settings are unchanged, else a new one (which replaces it)."""
        previous = _BUILT.get(model)
        if (
            previous is not None
            and previous.vocab_size == vocab_size
            and previous.max_length == max_length
            and previous.fingerprint is not None
            and previous.fingerprint == _fingerprint(model)
            and previous.copied == (copied_weight_bytes(model, vocab_size) <= copy_limit_bytes)
        ):
            return previous
        decoder = cls(model, vocab_size, max_length, copy_limit_bytes)
        _BUILT[model] = decoder
        return decoder

    def _transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` ``[out, in]`` as ``[in, out]``: a contiguous copy (CPU matmuls with a row-major right
        operand run up to 2x faster) or, over the copy limit, a view."""
        return weight.t().contiguous() if self.copied else weight.t()

    def _fused(self, linears: Sequence[ColumnParallelLinear]) -> _Matmul:
        if not self.copied:
            return [(linear.weight.t(), linear.bias) for linear in linears]
        biases = [linear.bias for linear in linears]
        # the linears of one fused matmul all have a bias or none (config.qkv_bias; the MLP has none)
        bias = None if biases[0] is None else torch.cat(cast(List[torch.Tensor], biases))
        return [(torch.cat([linear.weight for linear in linears]).t().contiguous(), bias)]

    def _layer(self, layer: DecoderLayer) -> _Layer:
        attention, mlp = layer.attention, layer.mlp
        return _Layer(
            layer.input_norm.weight,
            self._fused([attention.q_proj, attention.k_proj, attention.v_proj]),
            self._transposed(attention.o_proj.weight),
            layer.mlp_norm.weight,
            self._fused([mlp.gate_proj, mlp.up_proj]),
            self._transposed(mlp.down_proj.weight),
        )

    def _rotary_tables(self, positions: int) -> None:
        """Grow the rotary tables to cover ``positions`` (doubling, up to ``max_length``). ``sin`` carries
        rotate_half's sign, so a rotation is ``x * cos + swap_halves(x) * sin``."""
        if positions <= self.cos.shape[0]:
            return
        count = min(max(positions, 2 * self.cos.shape[0]), self.max_length)
        cos, sin = rotary_cos_sin(torch.arange(count, device=self.device), self.head_dim, *self._rope)
        half = self.head_dim // 2
        self.cos, self.sin = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    # ------------------------------------------------------------------------------------------- public
    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, capacity: int) -> Tuple[DecodeState, torch.Tensor]:
        """Run left-padded prompts ``tokens`` ``[batch, width]`` (``valid``: True on real tokens) into a new
        cache of ``capacity`` slots per row; returns it and the logits ``[batch, vocab_size]`` of the last slot."""
        batch, width = tokens.shape
        if width > capacity:
            raise ValueError(f"FastDecoder: capacity {capacity} must hold the prompts ({width})")
        # left padding: a short prompt's slots may run past max_length, but its positions never do
        self._rotary_tables(min(capacity, self.max_length))
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        shape = (len(self.layers), batch, self.num_kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device).transpose(-1, -2).contiguous()
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        mask = torch.zeros(batch, self.num_kv_heads, 1, capacity, dtype=self.dtype, device=self.device)
        mask[..., :width].masked_fill_(~valid[:, None, None], float("-inf"))
        state = DecodeState(keys, values, mask, positions[:, -1:] + 1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril_()
        allowed = (valid.unsqueeze(-1) == valid.unsqueeze(-2)) & causal
        prompt_mask = torch.zeros(batch, 1, width, width, dtype=self.dtype, device=self.device)
        prompt_mask.masked_fill_(~allowed.unsqueeze(1), float("-inf"))
        return state, self._forward(tokens, positions, state, prompt_mask)

    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``tokens`` ``[batch]``); the logits ``[batch, vocab_size]`` that follow it."""
        if state.length >= state.capacity:
            raise ValueError(f"FastDecoder: the cache's {state.capacity} slots are full")
        logits = self._forward(tokens.unsqueeze(1), state.positions, state, None)
        state.positions = state.positions + 1
        return logits

    # ----------------------------------------------------------------------------------------- internals
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the reference's arithmetic without its dtype casts
            return torch.mul(x, torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True).add_(self.eps))).mul_(weight)
        return rms_norm(x, weight, self.eps)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState, prompt_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Run ``tokens`` ``[batch, seq]`` at ``positions`` into the cache from ``state.length`` on; the last
        position's logits. ``prompt_mask`` ``[batch, 1, seq, seq]`` for a prefill (the cache is empty then)."""
        batch, seq = tokens.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        groups, rows, scale = heads // kv_heads, batch * kv_heads, dim**-0.5
        start, end = state.length, state.length + seq
        upcast = self.dtype != torch.float32  # rotary runs in fp32 (megalign.ops.apply_rotary)
        cos = self.cos[positions].unsqueeze(2)  # [batch, seq, 1, dim]
        sin = self.sin[positions].unsqueeze(2)
        # this step's slices of every layer's cache: written (new slots), read (all slots so far)
        key_slots = state.keys[..., start:end].permute(0, 1, 4, 2, 3)  # [layers, batch, seq, kv_heads, dim]
        value_slots = state.values[:, :, :, start:end].transpose(2, 3)
        all_keys = state.keys.view(len(self.layers), rows, dim, -1)[..., :end]
        all_values = state.values.view(len(self.layers), rows, -1, dim)[:, :, :end]
        mask = state.mask.view(rows, 1, -1)[..., :end]
        x = F.embedding(tokens, self.embedding).view(batch * seq, -1)
        for index, layer in enumerate(self.layers):
            qkv = _matmul(self._norm(x, layer.input_norm), layer.qkv).view(batch, seq, heads + 2 * kv_heads, dim)
            qk = qkv[:, :, : heads + kv_heads]
            if upcast:
                qk = qk.float()
            swapped = qk.unflatten(-1, (2, dim // 2)).flip(-2).flatten(-2)
            qk = qk * cos + swapped * sin
            if upcast:
                qk = qk.to(self.dtype)
            key_slots[index] = qk[:, :, heads:]
            value_slots[index] = qkv[:, :, heads + kv_heads :]
            if prompt_mask is None:  # one new token: each key/value head's query heads as a group of rows
                scores = torch.baddbmm(mask, qk[:, 0, :heads].reshape(rows, groups, dim), all_keys[index], alpha=scale)
                out = torch.bmm(torch.softmax(scores, dim=-1), all_values[index])
            else:  # a prefill: the cache holds just these tokens
                out = F.scaled_dot_product_attention(
                    qk[:, :, :heads].transpose(1, 2),
                    qk[:, :, heads:].transpose(1, 2),
                    qkv[:, :, heads + kv_heads :].transpose(1, 2),
                    attn_mask=prompt_mask,
                    enable_gqa=heads != kv_heads,
                ).transpose(1, 2)
            x = torch.addmm(x, out.reshape(batch * seq, heads * dim), layer.o)
            gate, up = _matmul(self._norm(x, layer.mlp_norm), layer.gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, layer.down)
        state.length = end
        last = x.view(batch, seq, -1)[:, -1]
        return torch.mm(self._norm(last, self.final_norm), self.lm_head)


class _ModelState:
    """:class:`DecodeState`'s counterpart for :class:`ModelDecoder`: a KVCache and the next positions."""

    def __init__(self, cache: KVCache, positions: torch.Tensor) -> None:
        self.cache, self.positions = cache, positions

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        self.positions = self.positions.index_select(0, rows)


class ModelDecoder:
    """:class:`FastDecoder`'s interface over the model's own forward with a :class:`KVCache` (the reference
    path: any GPTModel, module hooks see every pass)."""

    def __init__(self, model: GPTModel, vocab_size: int) -> None:
        self.model, self.vocab_size = model, vocab_size

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, capacity: int) -> Tuple[_ModelState, torch.Tensor]:
        """As :meth:`FastDecoder.prefill`."""
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        cache = KVCache.for_model(self.model, tokens.shape[0], capacity)
        logits = self.model(tokens, position_ids=positions, segment_ids=valid.long(), kv_cache=cache, logits_to_keep=1)
        return _ModelState(cache, positions[:, -1:] + 1), logits[:, -1, : self.vocab_size]

    def step(self, state: _ModelState, tokens: torch.Tensor) -> torch.Tensor:
        """As :meth:`FastDecoder.step`."""
        logits = self.model(tokens.unsqueeze(1), position_ids=state.positions, kv_cache=state.cache)
        state.positions = state.positions + 1
        return logits[:, -1, : self.vocab_size]
