"""Everything that knows about parallelism: the parallel context and process groups, Megatron's
tensor-parallel layers, autograd-aware collectives, vocabulary-parallel cross-entropy and the helpers that
move between full tensors and TP shards. Model code uses these and never calls torch.distributed."""

from __future__ import annotations

from megalign.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalign.parallel.layers import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_input,
    column_parallel_linear,
    divide,
    init_normal,
)
from megalign.parallel.mappings import (
    SEQUENCE_DIM,
    all_reduce_gradient,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_sequence_parallel,
    scatter_to_tensor_parallel,
    sequence_parallel_parameter,
)
from megalign.parallel.sharding import (
    gather_state_dict,
    gather_tensor,
    mark_tensor_parallel,
    shard,
    shard_state_dict,
    tensor_parallel_axis,
    tensor_parallel_replicas,
)
from megalign.parallel.state import ParallelContext, ParallelState, initialize_parallel
from megalign.parallel.subgroups import tensor_parallel_subgroup

__all__ = [
    "SEQUENCE_DIM",
    "ColumnParallelLinear",
    "InitMethod",
    "ParallelContext",
    "ParallelState",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_reduce_gradient",
    "column_parallel_input",
    "column_parallel_linear",
    "copy_to_tensor_parallel",
    "divide",
    "gather_from_sequence_parallel",
    "gather_from_tensor_parallel",
    "gather_state_dict",
    "gather_tensor",
    "init_normal",
    "initialize_parallel",
    "mark_tensor_parallel",
    "reduce_from_tensor_parallel",
    "reduce_scatter_to_sequence_parallel",
    "scatter_to_sequence_parallel",
    "scatter_to_tensor_parallel",
    "sequence_parallel_parameter",
    "shard",
    "shard_state_dict",
    "tensor_parallel_axis",
    "tensor_parallel_replicas",
    "tensor_parallel_subgroup",
    "vocab_parallel_cross_entropy",
]
