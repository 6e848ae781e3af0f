"""Grouped-query self-attention with rotary embeddings, causal, optionally document-masked.

:func:`core_attention` is the one place an attention backend is chosen: today torch's
``scaled_dot_product_attention`` (SDPA); flash-attn and Transformer Engine are dispatched there later.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalign.model.config import ModelConfig
from megalign.ops import apply_rotary
from megalign.parallel import ColumnParallelLinear, InitMethod, ParallelContext, RowParallelLinear, divide

__all__ = ["Attention", "core_attention", "document_causal_mask"]


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[batch, 1, seq, seq]``, True where query ``i`` may attend to key ``j``:
    ``j <= i`` and both positions are in the same document (equal segment ids)."""
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril_()
    same_document = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same_document & causal).unsqueeze(1)


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal softmax attention ``softmax(q kᵀ / sqrt(head_dim)) v`` in layout ``[batch, seq, heads, head_dim]``.

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: each key/value head serves
    ``q_heads / kv_heads`` consecutive query heads). With ``segment_ids`` ``[batch, seq]`` a position
    attends only to earlier positions of its own document. Returns ``q``'s shape.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [batch, heads, seq, head_dim]
    gqa = q.shape[1] != k.shape[1]
    if segment_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(segment_ids), enable_gqa=gqa)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """q/k/v projections (column-parallel, split by heads), rotary, :func:`core_attention`, o projection
    (row-parallel). Q/K/V biases when ``config.qkv_bias`` (Qwen2); no output bias."""

    def __init__(self, config: ModelConfig, context: ParallelContext, init_method: InitMethod,
                 output_init_method: InitMethod) -> None:
        super().__init__()
        tp = context.tensor_model_parallel_size
        self.head_dim = config.head_dim
        self.num_heads = divide(config.num_attention_heads, tp, "num_attention_heads")
        self.num_kv_heads = divide(config.num_key_value_heads, tp, "num_key_value_heads")
        hidden, kv_size = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = ColumnParallelLinear(hidden, hidden, context, bias=config.qkv_bias, init_method=init_method)
        self.k_proj = ColumnParallelLinear(hidden, kv_size, context, bias=config.qkv_bias, init_method=init_method)
        self.v_proj = ColumnParallelLinear(hidden, kv_size, context, bias=config.qkv_bias, init_method=init_method)
        self.o_proj = RowParallelLinear(hidden, hidden, context, bias=False, input_is_parallel=True,
                                        init_method=output_init_method)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``[batch, seq, hidden]`` → ``[batch, seq, hidden]``; ``cos``/``sin`` from ``rotary_cos_sin``."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = core_attention(q, k, v, segment_ids)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
