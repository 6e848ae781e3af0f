"""Everything that knows about parallelism. Today: the single-process context and Megatron's
tensor-parallel layers at size 1; model code uses these layers and never calls torch.distributed."""
from __future__ import annotations

from megalign.parallel.layers import (ColumnParallelLinear, InitMethod, RowParallelLinear, VocabParallelEmbedding,
                                      column_parallel_linear, divide, init_normal)
from megalign.parallel.state import ParallelContext

__all__ = ["ColumnParallelLinear", "InitMethod", "ParallelContext", "RowParallelLinear", "VocabParallelEmbedding",
           "column_parallel_linear", "divide", "init_normal"]
