"""Preallocated key/value cache for incremental decoding with :class:`megalign.model.GPTModel`.

Each decoder layer's keys and values live in one tensor ``[batch, kv_heads_local, max_length, head_dim]``
(``kv_heads_local``: the key/value heads this rank holds under tensor parallelism), written in place as
tokens arrive. All rows share one write offset, :attr:`KVCache.length`: a batch of prompts of different
lengths is **left-padded** so that every row ends at the same slot, and the padding is kept out of
attention by *segment ids*, exactly as documents are kept apart in packed training samples:

* every cached slot carries a segment id (``segment_ids`` ``[batch, max_length]``);
* a query at slot ``i`` attends to key slot ``j`` when ``j <= i`` and both have the same segment id.

The generator gives padding segment 0 and real tokens segment 1, so a real token never sees padding
and a padding slot sees only padding (no empty softmax rows). When a forward pass gives no segment ids,
the new tokens continue the segment of the row's last cached slot (0 for an empty cache), so plain
decoding steps need none.

    cache = KVCache.for_model(model, batch_size=4, max_length=512)
    logits = model(prompt_tokens, position_ids=positions, segment_ids=valid.long(), kv_cache=cache)
    logits = model(next_tokens, position_ids=positions + 1, kv_cache=cache)   # one new token per row

Finished rows are dropped with :meth:`KVCache.select` so later steps compute only the live rows.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Protocol, Tuple

import torch

__all__ = ["KVCache", "LayerCache"]


class CachedModel(Protocol):
    """What a cache is shaped from: a GPTModel or pipeline stage (its parameters and numbered decoder layers).
    A protocol, so that this module, which the decoder imports, does not import the decoder."""

    layers: Any  # nn.ModuleDict of decoder layers, keyed by global layer number

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def decoder_layer(self, index: int) -> Any: ...


class LayerCache:
    """One layer's view of a :class:`KVCache` during a forward pass: writes the new keys/values and returns
    everything cached so far together with the attention mask of the step."""

    def __init__(self, cache: "KVCache", layer: int) -> None:
        self.cache, self.layer = cache, layer

    def update(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``[batch, seq, kv_heads, head_dim]`` (the step's new tokens) at the cache offset.

        Returns ``(keys, values, mask)``: keys and values ``[batch, kv_heads, start + seq, head_dim]`` of every
        cached slot including the new ones, and the boolean mask ``[batch, 1, seq, start + seq]`` (True: may
        attend) that :meth:`KVCache.begin_step` built, in additive form (0 or -inf, the cache's dtype).
        """
        return self.cache.write(self.layer, key, value)


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows of up to ``max_length`` slots (see module doc)."""

    def __init__(
        self,
        layers: Tuple[int, ...],
        batch_size: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("kv_heads", kv_heads),
            ("max_length", max_length),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name}={value!r} must be a positive integer")
        shape = (batch_size, kv_heads, max_length, head_dim)
        self.keys: Dict[int, torch.Tensor] = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.values: Dict[int, torch.Tensor] = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.segment_ids = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.max_length, self.dtype = max_length, dtype
        self.length = 0
        self._step: Optional[Tuple[int, torch.Tensor]] = None  # (new tokens, mask) while a forward pass runs

    @classmethod
    def for_model(
        cls,
        model: CachedModel,
        batch_size: int,
        max_length: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> "KVCache":
        """A cache shaped for ``model`` (a GPTModel or pipeline stage): its layers, local key/value heads and
        head size; ``dtype``/``device`` default to the model's parameters'."""
        parameter = next(model.parameters())
        layers = tuple(int(name) for name in model.layers.keys())
        attention = model.decoder_layer(layers[0]).attention
        return cls(
            layers,
            batch_size,
            attention.num_kv_heads,
            max_length,
            attention.head_dim,
            dtype or parameter.dtype,
            device or parameter.device,
        )

    @property
    def batch_size(self) -> int:
        """Rows currently held."""
        return self.segment_ids.shape[0]

    def layer(self, index: int) -> LayerCache:
        """The view that decoder layer ``index`` (global number) uses during a forward pass."""
        if index not in self.keys:
            raise KeyError(f"KVCache holds layers {sorted(self.keys)}, not layer {index}")
        return LayerCache(self, index)

    def default_positions(self, seq: int) -> torch.Tensor:
        """Position ids ``[seq]`` of the next ``seq`` tokens when none are given: the cache offset onwards."""
        return torch.arange(self.length, self.length + seq, device=self.segment_ids.device)

    def begin_step(self, seq: int, segment_ids: Optional[torch.Tensor] = None) -> None:
        """Record the segment ids of ``seq`` new tokens per row and build the step's attention mask.

        ``segment_ids`` ``[batch, seq]``; None continues each row's last segment (see module doc).
        """
        batch, start = self.batch_size, self.length
        if self._step is not None:
            raise RuntimeError("KVCache.begin_step: the previous forward pass did not finish (end_step)")
        if seq <= 0 or start + seq > self.max_length:
            raise ValueError(
                f"KVCache: {seq} new tokens after {start} cached exceed max_length={self.max_length}; "
                "allocate a longer cache"
            )
        if segment_ids is None:
            last = self.segment_ids[:, start - 1 : start] if start else self.segment_ids[:, :1]
            self.segment_ids[:, start : start + seq] = last
        else:
            if tuple(segment_ids.shape) != (batch, seq):
                raise ValueError(f"KVCache: segment_ids {tuple(segment_ids.shape)} must be [batch={batch}, seq={seq}]")
            self.segment_ids[:, start : start + seq] = segment_ids
        end = start + seq
        query_segments = self.segment_ids[:, start:end].unsqueeze(-1)
        key_segments = self.segment_ids[:, :end].unsqueeze(-2)
        causal = torch.ones(seq, end, dtype=torch.bool, device=self.segment_ids.device).tril_(diagonal=start)
        allowed = ((query_segments == key_segments) & causal).unsqueeze(1)
        # additive form, built once per step: SDPA would otherwise convert a boolean mask in every layer
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        self._step = (seq, mask)

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`LayerCache.update` for layer ``layer``."""
        if self._step is None:
            raise RuntimeError("KVCache: a layer wrote keys outside a forward pass (call begin_step first)")
        seq, mask = self._step
        if key.shape[1] != seq:
            raise ValueError(f"KVCache: layer {layer} wrote {key.shape[1]} positions, the step has {seq}")
        start, end = self.length, self.length + seq
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = key.transpose(1, 2)
        values[:, :, start:end] = value.transpose(1, 2)
        return keys[:, :, :end], values[:, :, :end], mask

    def end_step(self) -> None:
        """Advance the offset past the tokens of the finished forward pass."""
        if self._step is None:
            raise RuntimeError("KVCache.end_step without begin_step")
        self.length += self._step[0]
        self._step = None

    def abort_step(self) -> None:
        """Forget a forward pass that failed midway (its slots are overwritten by the next one)."""
        self._step = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch, in the new order), e.g. the unfinished ones."""
        rows = rows.to(self.segment_ids.device)
        for store in (self.keys, self.values):
            for index, tensor in store.items():
                store[index] = tensor.index_select(0, rows)
        self.segment_ids = self.segment_ids.index_select(0, rows)
