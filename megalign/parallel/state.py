"""Where this process sits in the parallel layout.

Today megalign runs in one process per model replica: :class:`ParallelContext` describes tensor
parallelism of size 1. The parallelism work adds process groups here (from the torchrun environment)
without changing model code, which only reads sizes and ranks from the context it is given.
"""
from __future__ import annotations

from dataclasses import dataclass

from megalign.errors import ConfigError

__all__ = ["ParallelContext"]


@dataclass(frozen=True)
class ParallelContext:
    """Tensor-parallel size and this process's rank in its tensor-parallel group (validated)."""

    tensor_model_parallel_size: int = 1
    tensor_model_parallel_rank: int = 0

    def __post_init__(self) -> None:
        size, rank = self.tensor_model_parallel_size, self.tensor_model_parallel_rank
        for name, value, low in (("tensor_model_parallel_size", size, 1), ("tensor_model_parallel_rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"parallel context: {name}={value!r} must be an integer >= {low}")
        if rank >= size:
            raise ConfigError(f"parallel context: tensor_model_parallel_rank={rank} must be smaller than "
                              f"tensor_model_parallel_size={size}")
        if size > 1:
            raise ConfigError(f"tensor_model_parallel_size={size}: tensor parallelism arrives with the "
                              f"parallelism work (torch.distributed process groups) and is not available yet; "
                              f"use --tensor-model-parallel-size 1")

    @classmethod
    def single(cls) -> "ParallelContext":
        """The single-process context (no model parallelism)."""
        return cls()
