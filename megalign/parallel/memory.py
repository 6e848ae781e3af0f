"""Theoretical memory per rank of a training layout: weights, gradients, optimizer state and activations.

Bytes per parameter on the rank that holds it (Megatron's accounting, with megalign's fp32 gradient buffers):

| precision | weights | grads (fp32 ``main_grad``) | fp32 master | Adam moments | distributed optimizer |
| --- | --- | --- | --- | --- | --- |
| bf16/fp16 | 2 | 4 | 4 | 8 | master + moments / DP |
| fp32 | 4 | 4 | (the weights) | 8 | moments / DP |

Parameters per rank: each pipeline stage holds its layers (the most loaded stage is reported), the first
stage the embedding table and the last the final norm and LM head (a tied LM head is a second copy of the
table there when PP > 1, as in Megatron); matrices are split over TP, norm weights replicated.

Activations stored for the backward pass, per layer and token, in the compute dtype (an estimate after
Korthikanti et al. 2022, "Reducing Activation Recomputation", worked out for this decoder's layers):
norm inputs and outputs and the residual stream ``5h`` (split over TP only with sequence parallelism),
q/k/v after rotary ``h + 2·kv`` and the SwiGLU gate, up and product ``3·ffn`` (split over TP), plus the
attention probabilities ``heads·seq`` per token when the kernel stores them (SDPA's math path; not
flash-attn or selective recomputation). Full recomputation stores only each layer's input ``h`` plus one
layer's working set. The logits and their fp32 log-softmax, ``seq·vocab/TP`` per token (4 + dtype bytes),
live on the last stage. With the 1F1B schedule the first stage holds ``PP`` micro-batches in flight
(interleaved: ``PP·(1 + (PP-1)/(PP·v))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

from megalign.config.layout import stage_layer_ranges
from megalign.config.model import ModelConfig
from megalign.errors import ConfigError

__all__ = ["Layout", "MemoryEstimate", "estimate_memory", "rank_parameters"]

_GIB = float(1 << 30)


@dataclass(frozen=True)
class Layout:
    """A training layout: parallel sizes, batch shape, precision and memory-saving switches."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    micro_batch_size: int = 1
    seq_length: int = 4096
    bf16: bool = True
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute_granularity: Optional[str] = None
    flash_attention: bool = True
    num_layers_per_virtual_pipeline_stage: Optional[int] = None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank by category (the most loaded pipeline stage), with a GiB summary."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> Dict[str, float]:
        return {
            "weights": self.weights / _GIB,
            "gradients": self.gradients / _GIB,
            "optimizer": self.optimizer / _GIB,
            "activations": self.activations / _GIB,
            "total": self.total / _GIB,
        }

    def describe(self) -> str:
        g = self.as_gib()
        return (
            f"{self.parameters / 1e9:.2f}B parameters on the busiest rank | weights {g['weights']:.1f} GiB | "
            f"gradients {g['gradients']:.1f} GiB | optimizer {g['optimizer']:.1f} GiB | activations "
            f"{g['activations']:.1f} GiB | total {g['total']:.1f} GiB"
        )


def _layer_parameters(config: ModelConfig, tp: int) -> int:
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    kv_per_rank = kv // tp if config.num_key_value_heads >= tp else config.head_dim  # replicated KV heads
    attention = (h * h) // tp * 2 + 2 * h * kv_per_rank  # q and o split, k and v split or replicated
    if config.qkv_bias:
        attention += h // tp + 2 * kv_per_rank
    return attention + 3 * h * config.intermediate_size // tp + 2 * h  # SwiGLU split, two norms replicated


def rank_parameters(config: ModelConfig, tp: int, num_layers: int, first: bool, last: bool) -> int:
    """Parameters held by one rank: ``num_layers`` decoder layers at tensor-parallel size ``tp``, plus the
    embedding table shard on the first stage and the final norm and LM head (or the tied table's copy) on the
    last."""
    vocab_shard = config.vocab_size * config.hidden_size // tp
    total = num_layers * _layer_parameters(config, tp)
    if first:
        total += vocab_shard
    if last:
        total += config.hidden_size
        if not config.tie_word_embeddings:
            total += vocab_shard
        elif not first:
            total += vocab_shard  # the tied table's copy on the last stage
    return total


def _activation_bytes_per_token_layer(config: ModelConfig, layout: Layout, dtype_bytes: int) -> float:
    h, kv, f = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    tp = layout.tensor_model_parallel_size
    if layout.recompute_granularity == "full":
        return dtype_bytes * h / (tp if layout.sequence_parallel else 1)
    replicated = 5 * h / (tp if layout.sequence_parallel else 1)
    split = (h + 2 * kv + 3 * f) / tp
    scores = 0.0
    if not layout.flash_attention and layout.recompute_granularity != "selective":
        scores = config.num_attention_heads * layout.seq_length / tp
    return dtype_bytes * (replicated + split + scores)


def estimate_memory(config: ModelConfig, layout: Layout) -> MemoryEstimate:
    """Theoretical bytes on the busiest rank of ``layout`` for training ``config`` (see the module docstring)."""
    tp, pp, dp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size
    for name, value in (("tensor", tp), ("pipeline", pp), ("data", dp)):
        if value < 1:
            raise ConfigError(f"{name}-parallel size must be >= 1, got {value}")
    if config.num_attention_heads % tp or (config.num_key_value_heads % tp and tp % config.num_key_value_heads):
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} must divide num_attention_heads "
            f"{config.num_attention_heads} and divide (or be a multiple of) num_key_value_heads "
            f"{config.num_key_value_heads}"
        )
    chunks = 1
    if layout.num_layers_per_virtual_pipeline_stage:
        per_rank = config.num_layers // pp
        chunks = max(1, per_rank // layout.num_layers_per_virtual_pipeline_stage)
    ranges = stage_layer_ranges(config.num_layers, pp * chunks)
    layers_per_rank = max(sum(len(ranges[c * pp + r]) for c in range(chunks)) for r in range(pp))
    parameters = max(
        rank_parameters(config, tp, sum(len(ranges[c * pp + r]) for c in range(chunks)), first=r == 0, last=r == pp - 1)
        for r in range(pp)
    )

    dtype_bytes = 2 if layout.bf16 else 4
    master = 4 if layout.bf16 else 0
    optimizer_per_param = (master + 8) / (dp if layout.use_distributed_optimizer else 1)
    tokens = layout.micro_batch_size * layout.seq_length
    in_flight = 1.0
    if pp > 1:
        in_flight = pp * (1 + (pp - 1) / (pp * chunks)) if chunks > 1 else float(pp)
    per_layer = _activation_bytes_per_token_layer(config, layout, dtype_bytes)
    activations = tokens * per_layer * layers_per_rank * in_flight
    if layout.recompute_granularity == "full":  # one layer's working set during its recomputation
        activations += tokens * _activation_bytes_per_token_layer(
            config, Layout(**{**layout.__dict__, "recompute_granularity": None}), dtype_bytes
        )
    logits = tokens * config.vocab_size / tp * (4 + dtype_bytes)
    activations += logits  # on the last stage; added to the first stage's in-flight count: an upper bound
    return MemoryEstimate(
        parameters=int(parameters),
        weights=int(parameters * dtype_bytes),
        gradients=int(parameters * 4),
        optimizer=int(math.ceil(parameters * optimizer_per_param)),
        activations=int(activations),
    )
