"""Megatron's tensor-parallel layers (Shoeybi et al., 2019), holding this rank's shard of each weight.

* :class:`VocabParallelEmbedding`: rows ``[vocab / tp, hidden]``, rank ``r`` owns token ids
  ``[r * vocab / tp, (r + 1) * vocab / tp)``.
* :class:`ColumnParallelLinear`: ``Y = X Aᵀ`` with ``A`` ``[out, in]`` split by rows (output features),
  each rank holds ``[out / tp, in]`` and produces its slice of ``Y`` (gathered when ``gather_output``).
* :class:`RowParallelLinear`: ``A`` split by columns (input features), each rank holds ``[out, in / tp]``,
  multiplies its slice of ``X`` and the partial results are summed across ranks; the bias is added once.

Weights use ``nn.Linear``'s ``[out, in]`` layout. With tensor-parallel size 1 (the only size
:class:`~megalign.parallel.state.ParallelContext` accepts today) every layer is the plain math; the
communication of larger sizes goes into :func:`column_parallel_linear` and the layers' ``forward``
without changing the model code that uses them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalign.errors import ConfigError
from megalign.parallel.state import ParallelContext

__all__ = ["ColumnParallelLinear", "InitMethod", "RowParallelLinear", "VocabParallelEmbedding",
           "column_parallel_linear", "divide", "init_normal"]

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


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           context: ParallelContext, gather_output: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` this rank's output-feature shard ``[out / tp, in]``.

    Also the LM head of tied embeddings (``weight`` = the vocabulary-parallel embedding table). At
    tensor-parallel size 1 the input copy and the output gather are the identity.
    """
    return F.linear(x, weight, bias)


class VocabParallelEmbedding(nn.Module):
    """Token embedding table split over the vocabulary: this rank holds ``[vocab / tp, embedding_dim]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, context: ParallelContext = ParallelContext(),
                 init_method: InitMethod = _DEFAULT_INIT) -> None:
        super().__init__()
        tp, rank = context.tensor_model_parallel_size, context.tensor_model_parallel_rank
        self.context = context
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(num_embeddings, tp, "the vocabulary size (vocab_size)")
        self.vocab_start_index = rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
        init_method(self.weight.data)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings ``tokens.shape + (embedding_dim,)`` of integer token ids."""
        return F.embedding(tokens, self.weight)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, partition=[{self.vocab_start_index}, "
                f"{self.vocab_end_index})")


class ColumnParallelLinear(nn.Module):
    """Linear layer split over output features: weight ``[output_size / tp, input_size]``, bias ``[output_size / tp]``.

    The output stays split across ranks unless ``gather_output``; the layer that follows is then a
    :class:`RowParallelLinear` (``input_is_parallel=True``) or the per-head attention.
    """

    def __init__(self, input_size: int, output_size: int, context: ParallelContext = ParallelContext(),
                 bias: bool = True, gather_output: bool = False, init_method: InitMethod = _DEFAULT_INIT) -> None:
        super().__init__()
        self.context = context
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output
        self.output_size_per_partition = divide(output_size, context.tensor_model_parallel_size,
                                                "the output size of a column-parallel linear layer")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size))
        init_method(self.weight.data)
        self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., input_size]`` → ``[..., output_size / tp]`` (``[..., output_size]`` when gathered)."""
        return column_parallel_linear(x, self.weight, self.bias, self.context, self.gather_output)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Linear layer split over input features: weight ``[output_size, input_size / tp]``, bias ``[output_size]``.

    Each rank multiplies its slice of the input (already split when ``input_is_parallel``); the partial
    outputs are summed across ranks and the bias is added once, after the sum.
    """

    def __init__(self, input_size: int, output_size: int, context: ParallelContext = ParallelContext(),
                 bias: bool = True, input_is_parallel: bool = True, init_method: InitMethod = _DEFAULT_INIT) -> None:
        super().__init__()
        self.context = context
        self.input_size, self.output_size, self.input_is_parallel = input_size, output_size, input_is_parallel
        self.input_size_per_partition = divide(input_size, context.tensor_model_parallel_size,
                                               "the input size of a row-parallel linear layer")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition))
        init_method(self.weight.data)
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., input_size / tp]`` (or ``[..., input_size]`` if not ``input_is_parallel``) → ``[..., output_size]``."""
        partial = F.linear(x, self.weight)
        return partial if self.bias is None else partial + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, in_per_partition={self.input_size_per_partition}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")
