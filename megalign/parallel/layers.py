"""Megatron's tensor-parallel layers (Shoeybi et al., 2019), holding this rank's shard of each weight.

* :class:`VocabParallelEmbedding`: rows ``[vocab / tp, hidden]``, rank ``r`` owns token ids
  ``[r * vocab / tp, (r + 1) * vocab / tp)``; ids outside that range give zeros, and the ranks' outputs
  are summed (all-reduce; reduce-scatter along the sequence under sequence parallelism).
* :class:`ColumnParallelLinear`: ``Y = X Aᵀ`` with ``A`` ``[out, in]`` split by rows (output features),
  each rank holds ``[out / tp, in]`` and produces its slice of ``Y`` (gathered when ``gather_output``).
  Its input enters the TP region through :func:`column_parallel_input`: identity forward and all-reduce of
  the input gradient backward, or, under sequence parallelism, an all-gather of the sequence shards
  forward and a reduce-scatter of the gradient backward.
* :class:`RowParallelLinear`: ``A`` split by columns (input features), each rank holds ``[out, in / tp]``,
  multiplies its slice of ``X`` and the partial results are summed across ranks (all-reduce, or
  reduce-scatter along the sequence under sequence parallelism); the bias is added once, after the sum.

Weights use ``nn.Linear``'s ``[out, in]`` layout. **Initialisation**: every layer draws the FULL weight
with its ``init_method`` and keeps its slice (Megatron's ``--use-cpu-initialization`` idea). All ranks
draw the same numbers in the same order, so a model built at any TP size after ``torch.manual_seed(s)``
holds exactly the shards of the single-process model built after the same seed; this is what makes
TP runs equal to the single-process run. The cost is a transient full-size tensor per weight on each rank.
Each parameter is marked with how it is split (:mod:`megalign.parallel.sharding`).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megalign.errors import ConfigError
from megalign.parallel.mappings import (
    all_reduce_gradient,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tensor_parallel,
    sequence_parallel_parameter,
)
from megalign.parallel.sharding import mark_tensor_parallel, shard
from megalign.parallel.state import ParallelContext
from megalign.parallel.subgroups import tensor_parallel_subgroup

__all__ = [
    "ColumnParallelLinear",
    "InitMethod",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "column_parallel_input",
    "column_parallel_linear",
    "divide",
    "init_normal",
]

InitMethod = Callable[[torch.Tensor], None]


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``; ``ConfigError`` naming ``what`` (e.g. "num_attention_heads") unless exact."""
    if numerator % denominator:
        raise ConfigError(f"tensor_model_parallel_size={denominator} must divide {what}={numerator}")
    return numerator // denominator


def init_normal(std: float) -> InitMethod:
    """An init method drawing from ``normal(0, std)`` in place."""

    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)

    return init


_DEFAULT_INIT = init_normal(0.02)


def _sharded_parameter(
    full_shape: Tuple[int, ...],
    init: Optional[InitMethod],
    axis: Optional[int],
    context: ParallelContext,
    replicas: int = 1,
) -> nn.Parameter:
    """This rank's shard of a full tensor drawn by ``init`` (zeros when None), marked with its split."""
    full = torch.empty(full_shape)
    if init is None:
        full.zero_()
    else:
        init(full)
    piece = shard(full, axis, context.tensor_model_parallel_size, context.tensor_model_parallel_rank, replicas)
    return mark_tensor_parallel(nn.Parameter(piece), axis, replicas)


def column_parallel_input(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Bring ``x`` into a column-parallel region: the full sequence under sequence parallelism (all-gather
    forward, reduce-scatter backward), else identity forward and all-reduce of the gradient backward.
    Call it once for several column layers that share an input (q/k/v, gate/up) and pass
    ``input_prepared=True`` to them: one collective instead of one per layer."""
    if context.sequence_parallel:
        return gather_from_sequence_parallel(x, context)
    return copy_to_tensor_parallel(x, context)


def column_parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    context: ParallelContext,
    gather_output: bool = False,
    input_prepared: bool = False,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` this rank's output-feature shard ``[out / tp, in]``.

    Also the LM head of tied embeddings (``weight`` = the vocabulary-parallel embedding table). ``x`` is
    the replicated input (this rank's sequence shard under sequence parallelism) unless ``input_prepared``
    (already passed through :func:`column_parallel_input`). The output is this rank's feature slice, or
    all features when ``gather_output``. At tensor-parallel size 1 the communication is the identity.
    """
    if not input_prepared:
        x = column_parallel_input(x, context)
    out = F.linear(x, weight, bias)
    return gather_from_tensor_parallel(out, context) if gather_output else out


class VocabParallelEmbedding(nn.Module):
    """Token embedding table split over the vocabulary: this rank holds ``[vocab / tp, embedding_dim]``.

    Under sequence parallelism the output is this rank's sequence shard ``[batch, seq / tp, embedding_dim]``.
    With tensor parallelism, ids outside the vocabulary give a zero vector instead of an error (no rank
    owns them; checking would cost a host sync).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        context: ParallelContext = ParallelContext(),
        init_method: InitMethod = _DEFAULT_INIT,
    ) -> None:
        super().__init__()
        tp, rank = context.tensor_model_parallel_size, context.tensor_model_parallel_rank
        self.context = context
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(num_embeddings, tp, "the vocabulary size (vocab_size)")
        self.vocab_start_index = rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), init_method, 0, context)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings ``tokens.shape + (embedding_dim,)`` of integer token ids (sequence shard under SP)."""
        if self.context.tensor_model_parallel_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start_index) | (tokens >= self.vocab_end_index)
        local = torch.where(outside, torch.zeros_like(tokens), tokens - self.vocab_start_index)
        partial = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.context.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(partial, self.context)
        return reduce_from_tensor_parallel(partial, self.context)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, partition=[{self.vocab_start_index}, {self.vocab_end_index})"
        )


class ColumnParallelLinear(nn.Module):
    """Linear layer split over output features: weight ``[output_size / tp, input_size]``, bias ``[output_size / tp]``.

    The output stays split across ranks unless ``gather_output``; the layer that follows is then a
    :class:`RowParallelLinear` (``input_is_parallel=True``) or the per-head attention.

    ``replicas`` > 1: the weight is split into only ``tp / replicas`` pieces, and each group of ``replicas``
    consecutive TP ranks holds the same piece (key/value heads when TP exceeds their number). Their
    gradients are summed over that group in the backward pass, so every copy gets the full gradient.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        context: ParallelContext = ParallelContext(),
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod = _DEFAULT_INIT,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        tp = context.tensor_model_parallel_size
        if replicas < 1 or tp % replicas:
            raise ConfigError(f"column-parallel layer: replicas={replicas} must divide tensor_model_parallel_size={tp}")
        if gather_output and replicas > 1:
            raise ConfigError("column-parallel layer: gather_output cannot be combined with replicated shards")
        self.context, self.replicas = context, replicas
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output
        self.output_size_per_partition = divide(
            output_size, tp // replicas, "the output size of a column-parallel linear layer"
        )
        self.weight = _sharded_parameter((output_size, input_size), init_method, 0, context, replicas)
        self.bias = _sharded_parameter((output_size,), None, 0, context, replicas) if bias else None
        self._replica_group = tensor_parallel_subgroup(context, replicas)

    def forward(self, x: torch.Tensor, input_prepared: bool = False) -> torch.Tensor:
        """``x`` ``[..., input_size]`` → ``[..., output_size / tp]`` (``[..., output_size]`` when gathered);
        ``input_prepared``: ``x`` already went through :func:`column_parallel_input`."""
        weight: torch.Tensor = self.weight
        bias: Optional[torch.Tensor] = self.bias
        if self._replica_group is not None:
            weight = all_reduce_gradient(weight, self._replica_group)
            bias = None if bias is None else all_reduce_gradient(bias, self._replica_group)
        return column_parallel_linear(x, weight, bias, self.context, self.gather_output, input_prepared)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, replicas={self.replicas}"
        )


class RowParallelLinear(nn.Module):
    """Linear layer split over input features: weight ``[output_size, input_size / tp]``, bias ``[output_size]``.

    Each rank multiplies its slice of the input (already split when ``input_is_parallel``); the partial
    outputs are summed across ranks and the bias is added once, after the sum. Under sequence parallelism
    the sum is a reduce-scatter and the output is this rank's sequence shard.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        context: ParallelContext = ParallelContext(),
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod = _DEFAULT_INIT,
    ) -> None:
        super().__init__()
        if context.sequence_parallel and not input_is_parallel:
            raise ConfigError("row-parallel layer: sequence parallelism needs input_is_parallel=True")
        self.context = context
        self.input_size, self.output_size, self.input_is_parallel = input_size, output_size, input_is_parallel
        self.input_size_per_partition = divide(
            input_size, context.tensor_model_parallel_size, "the input size of a row-parallel linear layer"
        )
        self.weight = _sharded_parameter((output_size, input_size), init_method, 1, context)
        self.bias = _sharded_parameter((output_size,), None, None, context) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., input_size / tp]`` (``[..., input_size]`` if not ``input_is_parallel``) →
        ``[..., output_size]`` (this rank's sequence shard ``[batch, seq / tp, output_size]`` under sequence
        parallelism)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x, self.context)
        partial = F.linear(x, self.weight)
        if self.context.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel(partial, self.context)
        else:
            out = reduce_from_tensor_parallel(partial, self.context)
        return out if self.bias is None else out + sequence_parallel_parameter(self.bias, self.context)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, in_per_partition={self.input_size_per_partition}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )
