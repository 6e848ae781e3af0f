"""Process groups of consecutive ranks inside a tensor-parallel group (e.g. the TP ranks that share one
key/value head when there are more TP ranks than key/value heads).

``torch.distributed.new_group`` must be called by every process of the job, in the same order, for every
group (also the groups a process is not part of). :func:`tensor_parallel_subgroup` therefore creates the
subgroups of *all* TP groups at once, from the TP-innermost layout of :mod:`megalign.parallel.state`
(TP group ``k`` is global ranks ``[k * tp, (k + 1) * tp)``), and caches them. Model construction calls it
on every rank in the same order, which is all the ordering it needs.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.distributed as dist

from megalign.errors import ConfigError
from megalign.parallel.state import ParallelContext

__all__ = ["tensor_parallel_subgroup"]

_CACHE: Dict[Tuple[int, int, int, int], Any] = {}


def tensor_parallel_subgroup(context: ParallelContext, size: int) -> Optional[Any]:
    """The group of the ``size`` consecutive TP ranks that contains this rank (TP ranks ``[r // size * size,
    r // size * size + size)``), or None when ``size`` is 1. ``size`` must divide the TP size."""
    tp = context.tensor_model_parallel_size
    if size == 1:
        return None
    if size < 1 or tp % size:
        raise ConfigError(
            f"a tensor-parallel subgroup of {size} ranks needs a tensor-parallel size divisible by "
            f"{size}, got tensor_model_parallel_size={tp}"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    start = rank - context.tensor_model_parallel_rank
    expected = list(range(start, start + tp))
    if dist.get_process_group_ranks(context.group) != expected:
        raise ConfigError(
            f"tensor-parallel group of rank {rank} is {dist.get_process_group_ranks(context.group)}; "
            f"subgroups assume the TP-innermost layout {expected} (build it with initialize_parallel)"
        )
    key = (id(dist.group.WORLD), world, tp, size)
    if key not in _CACHE:
        mine = None
        for first in range(0, world, size):  # every rank creates every subgroup, in the same order
            ranks = list(range(first, first + size))
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        _CACHE[key] = mine
    return _CACHE[key]
