"""Joining a torchrun job: backend and device choice, and agreeing on a decision across ranks.

``torchrun --nproc-per-node N pretrain_gpt.py ...`` (or a SLURM script running torchrun on every node with a
c10d rendezvous) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed`
reads them (``env://``). Without WORLD_SIZE > 1 nothing is initialised and the run is single-process.
:func:`setup_parallel` does both steps of a training run from its parallel section.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from megalign.config.sections import ParallelSection
from megalign.errors import ConfigError
from megalign.parallel.state import ParallelState, default_device, initialize_parallel

__all__ = ["any_rank", "init_distributed", "setup_parallel"]


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 10) -> torch.device:
    """Initialise the default process group from torchrun's environment (if WORLD_SIZE > 1); return the device.

    ``backend``: nccl or gloo; by default nccl when CUDA is available, else gloo. A CUDA process uses the GPU
    of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device()
    if world <= 1 or dist.is_initialized():
        return device
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun "
            "(e.g. torchrun --nproc-per-node 4 pretrain_gpt.py ...)"
        )
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--distributed-backend nccl needs CUDA GPUs; use gloo on CPUs")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def setup_parallel(parallel: ParallelSection) -> Tuple[torch.device, ParallelState]:
    """Join the job (--distributed-backend, --distributed-timeout-minutes) and build its TP, DP and PP groups
    (--tensor-model-parallel-size, --pipeline-model-parallel-size, --sequence-parallel); returns the device
    and this rank's :class:`ParallelState`."""
    device = init_distributed(parallel.distributed_backend, parallel.distributed_timeout_minutes)
    state = initialize_parallel(
        parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, parallel.sequence_parallel
    )
    if state.pipeline_group is not None:
        # The first batch_isend_irecv on a group must involve all of its ranks under NCCL unless the group has
        # already run a collective; the pipeline's first batches involve only neighbours, so run one here.
        dist.barrier(group=state.pipeline_group)
    return device, state


def any_rank(flag: bool, device: torch.device, group: Optional[Any] = None) -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. a preemption signal seen by one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)
