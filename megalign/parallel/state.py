"""Where this process sits in the parallel layout, and the process groups of each parallel dimension.

World layout (Megatron's order): tensor parallelism (TP) innermost, so a TP group is adjacent ranks on
one node; then data parallelism (DP); then pipeline parallelism (PP)::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

:func:`rank_layout` computes the groups as plain lists (no torch.distributed needed, so it is tested
and documented on its own); :func:`initialize_parallel` creates them as process groups. Model code sees
only a :class:`ParallelContext` (TP size, rank, group and whether sequence parallelism is on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megalign.config.layout import data_parallel_size
from megalign.errors import ConfigError

__all__ = ["ParallelContext", "ParallelState", "RankLayout", "default_device", "initialize_parallel", "rank_layout"]


@dataclass(frozen=True)
class ParallelContext:
    """What a model layer needs to know: the TP size, this rank in its TP group, the group, and whether
    activations outside attention/MLP are split along the sequence (``sequence_parallel``)."""

    tensor_model_parallel_size: int = 1
    tensor_model_parallel_rank: int = 0
    sequence_parallel: bool = False
    group: Optional[Any] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        size, rank = self.tensor_model_parallel_size, self.tensor_model_parallel_rank
        for name, value, low in (("tensor_model_parallel_size", size, 1), ("tensor_model_parallel_rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"parallel context: {name}={value!r} must be an integer >= {low}")
        if rank >= size:
            raise ConfigError(
                f"parallel context: tensor_model_parallel_rank={rank} must be smaller than "
                f"tensor_model_parallel_size={size}"
            )
        if size > 1 and self.group is None:
            raise ConfigError(
                f"parallel context: tensor_model_parallel_size={size} needs its process group "
                "(build contexts with initialize_parallel)"
            )

    @classmethod
    def single(cls) -> "ParallelContext":
        """The single-process context (no model parallelism)."""
        return cls()


@dataclass(frozen=True)
class RankLayout:
    """The global ranks of every group of one parallel dimension, and this rank's coordinates."""

    tensor: List[List[int]]
    data: List[List[int]]
    pipeline: List[List[int]]
    model: List[List[int]]  # TP x PP: the ranks holding the different parts of one model replica
    embedding: List[List[int]]  # first and last pipeline stage of each (DP, TP) position, when PP > 1

    def coordinates(self, rank: int) -> Dict[str, int]:
        """``{"tensor": tp_rank, "data": dp_rank, "pipeline": pp_rank}`` of global ``rank``."""
        found = {}
        for name in ("tensor", "data", "pipeline", "model", "embedding"):
            for group in getattr(self, name):
                if rank in group:
                    found[name] = group.index(rank)
        return found


def rank_layout(
    world_size: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> RankLayout:
    """Groups of the TP-innermost, then DP, then PP layout; ConfigError naming the constraint if sizes do not fit."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    dp = data_parallel_size(world_size, tp, pp)

    def rank(t: int, d: int, p: int) -> int:
        return p * dp * tp + d * tp + t

    return RankLayout(
        tensor=[[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        data=[[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        pipeline=[[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        model=[sorted(rank(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)],
        embedding=[[rank(t, d, 0), rank(t, d, pp - 1)] for d in range(dp) for t in range(tp)] if pp > 1 else [],
    )


@dataclass(frozen=True)
class ParallelState:
    """This process's place in every parallel dimension, with the process groups (None when of size 1).

    ``model_group`` joins the ranks that hold different parts of one model replica (its TP x PP ranks):
    global gradient norms and NaN checks are reduced over it. ``embedding_group`` (PP > 1) joins the first
    and the last pipeline stage, which both hold the table of tied embeddings and sum its gradients.
    """

    world_size: int = 1
    rank: int = 0
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    tensor_model_parallel_rank: int = 0
    pipeline_model_parallel_rank: int = 0
    data_parallel_rank: int = 0
    sequence_parallel: bool = False
    tensor_group: Optional[Any] = field(default=None, compare=False, repr=False)
    data_group: Optional[Any] = field(default=None, compare=False, repr=False)
    pipeline_group: Optional[Any] = field(default=None, compare=False, repr=False)
    model_group: Optional[Any] = field(default=None, compare=False, repr=False)
    embedding_group: Optional[Any] = field(default=None, compare=False, repr=False)
    pipeline_ranks: List[int] = field(default_factory=lambda: [0], compare=False)

    @property
    def context(self) -> ParallelContext:
        """The model layers' view: tensor parallelism only."""
        return ParallelContext(
            self.tensor_model_parallel_size, self.tensor_model_parallel_rank, self.sequence_parallel, self.tensor_group
        )

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == self.pipeline_model_parallel_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints: data-parallel rank 0, tensor rank 0, on the last pipeline stage (it has the loss)."""
        return self.data_parallel_rank == 0 and self.tensor_model_parallel_rank == 0 and self.is_last_stage


def initialize_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, sequence_parallel: bool = False
) -> ParallelState:
    """Create the TP, DP and PP process groups of the running ``torch.distributed`` job (or the single
    process state when it is not initialised); every rank must call this, in the same order."""
    if sequence_parallel and tensor_model_parallel_size == 1:
        raise ConfigError(
            "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the activations "
            "that tensor parallelism replicates)"
        )
    if not (dist.is_available() and dist.is_initialized()):
        rank_layout(1, tensor_model_parallel_size, pipeline_model_parallel_size)  # raises unless both are 1
        return ParallelState()
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = rank_layout(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    mine: Dict[str, Any] = {}
    for name in ("tensor", "data", "pipeline", "model", "embedding"):
        for ranks in getattr(layout, name):
            group = dist.new_group(ranks) if len(ranks) > 1 else None  # every rank creates every group
            if rank in ranks:
                mine[name] = (group, ranks)
    coords = layout.coordinates(rank)
    return ParallelState(
        world_size=world,
        rank=rank,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        data_parallel_size=world // (tensor_model_parallel_size * pipeline_model_parallel_size),
        tensor_model_parallel_rank=coords["tensor"],
        pipeline_model_parallel_rank=coords["pipeline"],
        data_parallel_rank=coords["data"],
        sequence_parallel=sequence_parallel,
        tensor_group=mine["tensor"][0],
        data_group=mine["data"][0],
        pipeline_group=mine["pipeline"][0],
        model_group=mine["model"][0],
        embedding_group=mine.get("embedding", (None,))[0],
        pipeline_ranks=list(mine["pipeline"][1]),
    )


def default_device() -> torch.device:
    """This process's device: its local CUDA device under torchrun when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
