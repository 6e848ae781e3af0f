"""Grouped-query self-attention with rotary embeddings, causal, optionally document-masked.

Tensor parallelism splits the heads: each rank holds ``num_attention_heads / tp`` query heads and the
key/value heads they use. When ``tp <= num_key_value_heads`` the key/value heads are split too (``tp``
must divide them); when ``tp > num_key_value_heads`` (``tp`` must be a multiple of them) each rank keeps
the ONE key/value head its query heads use, replicated over the ``tp / num_key_value_heads`` ranks that
share it, whose k/v weight gradients are summed (``ColumnParallelLinear(replicas=...)``). Under sequence
parallelism the input arrives as this rank's sequence shard and is all-gathered once for q, k and v, so
attention always sees the whole sequence (positions and ``segment_ids`` are the full ``[batch, seq]``).

The attention core (scores, softmax, weighted values) runs on the kernel chosen by
``ModelOptions.attention_backend`` (see :mod:`megalign.model.attention_backends`); with selective
recomputation it is recomputed in the backward pass instead of storing its ``[seq, seq]`` intermediates.

Incremental decoding (``cache``, a :class:`megalign.model.kv_cache.LayerCache`): the new tokens' keys and
values are written into the preallocated cache and the queries attend to every cached slot under the
cache's mask (causal over the cache offset, segments keeping left padding out). This path always runs on
torch SDPA, whatever the backend option (the GPU kernels' fixed causal masks do not cover a cache offset
with padding); without a cache nothing changes.

Heads are ``config.head_dim`` wide (Megatron's --kv-channels, else hidden / heads), so q_proj writes and o_proj
reads ``num_attention_heads * head_dim`` features. Attention dropout (``config.attention_dropout``, training
only) drops attention probabilities with a mask drawn per global head from the seed the caller passes
(:class:`~megalign.model.attention_backends.AttentionDropout`): the same at any TP size, and again the same
when selective recomputation reruns the core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalign.config.model import ModelConfig, ModelOptions
from megalign.errors import ConfigError
from megalign.model.attention_backends import AttentionDropout, document_causal_mask, dot_product_attention
from megalign.ops import apply_rotary
from megalign.parallel import (
    ColumnParallelLinear,
    InitMethod,
    ParallelContext,
    RowParallelLinear,
    column_parallel_input,
    divide,
)

if TYPE_CHECKING:
    from megalign.model.kv_cache import LayerCache

__all__ = ["Attention", "cached_attention", "document_causal_mask"]


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(head_dim) + mask) v`` of new queries ``q`` ``[batch, seq, heads, head_dim]`` over
    cached ``keys``/``values`` ``[batch, kv_heads, length, head_dim]``; ``mask`` ``[batch, 1, seq, length]`` is
    additive (0 where a query may attend, -inf elsewhere) or boolean (True where it may). Returns ``q``'s shape.
    Grouped-query heads as in :func:`dot_product_attention`."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=q.shape[2] != keys.shape[1]
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """q/k/v projections (column-parallel, split by heads), rotary, the attention core, o projection
    (row-parallel). Q/K/V biases when ``config.qkv_bias`` (Qwen2); no output bias."""

    def __init__(
        self,
        config: ModelConfig,
        context: ParallelContext,
        init_method: InitMethod,
        output_init_method: InitMethod,
        options: ModelOptions = ModelOptions(),
    ) -> None:
        super().__init__()
        tp, kv_heads = context.tensor_model_parallel_size, config.num_key_value_heads
        self.context = context
        self.head_dim = config.head_dim
        self.num_heads = divide(config.num_attention_heads, tp, "num_attention_heads")
        if tp > kv_heads and tp % kv_heads:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} is larger than num_key_value_heads={kv_heads}, so it "
                f"must be a multiple of it (each key/value head is replicated on tp / kv_heads ranks)"
            )
        kv_replicas = max(tp // kv_heads, 1)
        self.num_kv_heads = 1 if kv_replicas > 1 else divide(kv_heads, tp, "num_key_value_heads")
        self.backend = options.attention_backend
        self.recompute_core = options.recompute_granularity == "selective"
        self.dropout_p = config.attention_dropout
        hidden, kv_size, q_size = (
            config.hidden_size,
            config.num_key_value_heads * config.head_dim,
            config.attention_size,
        )
        self.q_proj = ColumnParallelLinear(hidden, q_size, context, bias=config.qkv_bias, init_method=init_method)
        self.k_proj = ColumnParallelLinear(
            hidden, kv_size, context, bias=config.qkv_bias, init_method=init_method, replicas=kv_replicas
        )
        self.v_proj = ColumnParallelLinear(
            hidden, kv_size, context, bias=config.qkv_bias, init_method=init_method, replicas=kv_replicas
        )
        self.o_proj = RowParallelLinear(
            q_size, hidden, context, bias=False, input_is_parallel=True, init_method=output_init_method
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segment_ids: Optional[torch.Tensor] = None,
        cache: Optional["LayerCache"] = None,
        dropout_seed: Optional[int] = None,
    ) -> torch.Tensor:
        """``x`` ``[batch, seq, hidden]`` → ``[batch, seq, hidden]`` (``[batch, seq / tp, hidden]`` in and out under
        sequence parallelism); ``cos``/``sin`` from ``rotary_cos_sin``, for the full sequence. With ``cache``,
        ``x`` holds only the new tokens (``segment_ids`` are then the cache's business, not used here).
        ``dropout_seed``: draw the attention-dropout masks from it (training; None: no dropout)."""
        x = column_parallel_input(x, self.context)
        batch, seq, _ = x.shape
        q = self.q_proj(x, input_prepared=True).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x, input_prepared=True).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, input_prepared=True).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = None
        if dropout_seed is not None and self.dropout_p > 0 and self.training and cache is None:
            first_head = self.context.tensor_model_parallel_rank * self.num_heads
            dropout = AttentionDropout(self.dropout_p, dropout_seed, first_head)
        if cache is not None:
            out = cached_attention(q, *cache.update(k, v))
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(dot_product_attention, q, k, v, segment_ids, self.backend, dropout, use_reentrant=False)
        else:
            out = dot_product_attention(q, k, v, segment_ids, self.backend, dropout)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
