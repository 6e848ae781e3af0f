"""The LLaMA-3 / Qwen2 decoder as one plain ``nn.Module`` built from megalign.parallel layers.

::

    x = embed_tokens(tokens)
    for layer in layers:                      # pre-norm residual blocks
        x = x + attention(input_norm(x))      # GQA + rotary, causal (document-masked with segment_ids)
        x = x + mlp(mlp_norm(x))              # SwiGLU
    logits = lm_head(final_norm(x))           # or the embedding table when tie_word_embeddings

Initialisation (Megatron's): every matrix from ``normal(0, init_std)``, except the projections that
write into the residual stream (attention ``o_proj`` and MLP ``down_proj``), whose std is divided by
``sqrt(2 * num_layers)`` so the residual's variance does not grow with depth (two such writes per
layer; GPT-2 / Megatron "scaled init"). Norm weights start at 1, biases at 0.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalign.model.attention import Attention
from megalign.model.config import ModelConfig, ModelOptions
from megalign.model.mlp import MLP
from megalign.ops import cross_entropy, rms_norm, rotary_cos_sin
from megalign.parallel import (ColumnParallelLinear, InitMethod, ParallelContext, VocabParallelEmbedding,
                               column_parallel_linear, init_normal)

__all__ = ["DecoderLayer", "GPTModel", "RMSNorm", "recompute_plan"]


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-feature scale (initialised to 1)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """One pre-norm block: attention and MLP, each behind an RMSNorm and added to the residual."""

    def __init__(self, config: ModelConfig, context: ParallelContext, init_method: InitMethod,
                 output_init_method: InitMethod, options: ModelOptions = ModelOptions()) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, context, init_method, output_init_method, options)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, context, init_method, output_init_method)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cos, sin, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


def recompute_plan(num_layers: int, options: ModelOptions) -> List[Tuple[range, bool]]:
    """The layer stack as consecutive ``(layers, recomputed)`` runs for :meth:`GPTModel.forward`.

    A recomputed run stores only its input and runs its layers again in the backward pass (Megatron's
    full recomputation). ``uniform``: all layers, in runs of ``recompute_num_layers``; ``block``: the first
    ``recompute_num_layers`` layers one run each, the rest as one ordinary run. Without full recomputation,
    one ordinary run of all layers.
    """
    if options.recompute_granularity != "full":
        return [(range(num_layers), False)]
    n = min(options.recompute_num_layers, num_layers)
    if options.recompute_method == "uniform":
        return [(range(start, min(start + n, num_layers)), True) for start in range(0, num_layers, n)]
    plan = [(range(index, index + 1), True) for index in range(n)]
    return plan + ([(range(n, num_layers), False)] if n < num_layers else [])


class GPTModel(nn.Module):
    """Decoder-only language model of ``config``'s shape; this rank's shards under ``context``.

    ``options`` choose the attention kernel and activation recomputation (they do not change the result).
    """

    def __init__(self, config: ModelConfig, context: ParallelContext = ParallelContext(),
                 options: ModelOptions = ModelOptions()) -> None:
        super().__init__()
        self.config, self.context, self.options = config, context, options
        init_method = init_normal(config.init_std)
        output_init_method = init_normal(config.init_std / math.sqrt(2.0 * config.num_layers))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, context, init_method)
        self.layers = nn.ModuleList(DecoderLayer(config, context, init_method, output_init_method, options)
                                    for _ in range(config.num_layers))
        self.recompute_plan = recompute_plan(config.num_layers, options)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: Optional[ColumnParallelLinear] = None
        if not config.tie_word_embeddings:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, context, bias=False,
                                                init_method=init_method)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of ``tokens`` ``[batch, seq]``, or the training loss when ``labels`` is given.

        ``position_ids`` ``[batch, seq]`` default to ``0..seq-1``; ``segment_ids`` ``[batch, seq]`` (documents
        packed in one sample) keep attention inside each document. ``labels`` are the next tokens (already
        shifted, as GPTDataset gives them); the loss is ``sum(ce * loss_mask) / sum(loss_mask)`` (0 when the
        mask is empty), or the mean over labels other than -100 without ``loss_mask``.
        """
        self._check_inputs(tokens, position_ids=position_ids, segment_ids=segment_ids, labels=labels,
                           loss_mask=loss_mask)
        config = self.config
        positions = tokens.shape[1] if position_ids is None else position_ids
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling,
                                  device=tokens.device)
        x = self.embed_tokens(tokens)
        recompute = torch.is_grad_enabled()
        for layers, recomputed in self.recompute_plan:
            if recomputed and recompute:
                x = checkpoint(self._run_layers, layers, x, cos, sin, segment_ids, use_reentrant=False)
            else:
                x = self._run_layers(layers, x, cos, sin, segment_ids)
        x = self.final_norm(x)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            logits = column_parallel_linear(x, self.embed_tokens.weight, None, self.context)
        if labels is None:
            return logits
        if loss_mask is None:
            return cross_entropy(logits, labels)
        losses = cross_entropy(logits, labels, reduction="none")
        mask = loss_mask.to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    def _run_layers(self, layers: range, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        for index in layers:
            x = self.layers[index](x, cos, sin, segment_ids)
        return x

    @staticmethod
    def _check_inputs(tokens: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"GPTModel: tokens must be an integer tensor [batch, seq], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        for name, value in others.items():
            if value is not None and value.shape != tokens.shape:
                raise ValueError(f"GPTModel: {name} has shape {tuple(value.shape)}; it must match tokens "
                                 f"{tuple(tokens.shape)}")
        if others["loss_mask"] is not None and others["labels"] is None:
            raise ValueError("GPTModel: loss_mask was given without labels")
