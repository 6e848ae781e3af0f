"""How each parameter is split over tensor-parallel (TP) ranks, and moving between full tensors and shards.

Every parameter of the parallel layers carries two attributes (read them with :func:`tensor_parallel_axis`
and :func:`tensor_parallel_replicas`):

* ``tensor_parallel_axis``: the dimension the full tensor is split along (0: output features of a
  column-parallel weight or bias, vocabulary rows of the embedding; 1: input features of a row-parallel
  weight), or None when every TP rank holds the whole tensor (norm weights, row-parallel biases).
* ``tensor_parallel_replicas``: how many consecutive TP ranks hold the *same* shard (1 normally; ``tp /
  num_key_value_heads`` for key/value projections when there are more TP ranks than key/value heads).
  The full tensor is split into ``tp / replicas`` pieces and TP rank ``r`` holds piece ``r // replicas``.

Checkpoints, the Hugging Face conversion and the tests use :func:`shard_state_dict` (full single-process
state dict → this rank's shards) and :func:`gather_state_dict` (shards → full tensors, on every rank).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Protocol, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from megalign.errors import ConfigError
from megalign.parallel.state import ParallelContext

__all__ = [
    "gather_state_dict",
    "gather_tensor",
    "mark_tensor_parallel",
    "shard",
    "shard_state_dict",
    "tensor_parallel_axis",
    "tensor_parallel_replicas",
]


_T = TypeVar("_T", bound=torch.Tensor)


class _TensorParallelMarks(Protocol):
    """The two attributes mark_tensor_parallel attaches to a tensor."""

    tensor_parallel_axis: Optional[int]
    tensor_parallel_replicas: int


def mark_tensor_parallel(param: _T, axis: Optional[int], replicas: int = 1) -> _T:
    """Record how ``param`` is split (see the module docstring); returns ``param``."""
    marks = cast(_TensorParallelMarks, param)
    marks.tensor_parallel_axis = axis
    marks.tensor_parallel_replicas = replicas
    return param


def tensor_parallel_axis(param: torch.Tensor) -> Optional[int]:
    """The dimension ``param`` is split along over TP ranks, or None when it is replicated."""
    return getattr(param, "tensor_parallel_axis", None)


def tensor_parallel_replicas(param: torch.Tensor) -> int:
    """How many consecutive TP ranks hold the same shard of ``param`` (1 unless key/value heads are replicated)."""
    return getattr(param, "tensor_parallel_replicas", 1)


def shard(full: torch.Tensor, axis: Optional[int], tp_size: int, tp_rank: int, replicas: int = 1) -> torch.Tensor:
    """TP rank ``tp_rank``'s piece of ``full`` (a contiguous copy): piece ``tp_rank // replicas`` of
    ``tp_size / replicas`` equal pieces along ``axis``; all of ``full`` when ``axis`` is None."""
    if axis is None:
        return full.detach().clone()
    if tp_size % replicas:
        raise ConfigError(f"shard: replicas={replicas} must divide the tensor-parallel size {tp_size}")
    pieces = tp_size // replicas
    if full.shape[axis] % pieces:
        raise ConfigError(
            f"shard: dimension {axis} of a tensor of shape {tuple(full.shape)} is not divisible into "
            f"{pieces} tensor-parallel pieces"
        )
    return full.detach().chunk(pieces, dim=axis)[tp_rank // replicas].contiguous().clone()


def _context_of(model: nn.Module, context: Optional[ParallelContext]) -> ParallelContext:
    if context is not None:
        return context
    found = getattr(model, "context", None)
    if not isinstance(found, ParallelContext):
        raise ValueError(f"{type(model).__name__} has no ParallelContext attribute `context`; pass context=")
    return found


def shard_state_dict(
    full_state: Mapping[str, torch.Tensor], model: nn.Module, context: Optional[ParallelContext] = None
) -> Dict[str, torch.Tensor]:
    """This rank's shards of a full (single-process) state dict, split as ``model``'s parameters are.

    ``context`` defaults to ``model.context``. Keys of ``full_state`` that ``model`` lacks, or parameters
    missing from it, are an error naming them (load the result with ``model.load_state_dict``).
    """
    context = _context_of(model, context)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(full_state)), sorted(set(full_state) - set(params))
    if missing or unexpected:
        raise ValueError(f"shard_state_dict: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
    out = {}
    for name, param in params.items():
        piece = shard(
            full_state[name],
            tensor_parallel_axis(param),
            context.tensor_model_parallel_size,
            context.tensor_model_parallel_rank,
            tensor_parallel_replicas(param),
        )
        if piece.shape != param.shape:
            raise ValueError(
                f"shard_state_dict: {name}: full shape {tuple(full_state[name].shape)} gives a shard of "
                f"{tuple(piece.shape)}, the model holds {tuple(param.shape)}"
            )
        out[name] = piece
    return out


def gather_tensor(
    local: torch.Tensor, axis: Optional[int], context: ParallelContext, replicas: int = 1
) -> torch.Tensor:
    """The full tensor of which every TP rank holds ``local`` (split as ``axis``/``replicas`` describe);
    a collective: every rank of the TP group must call it. A replicated tensor is returned as a copy."""
    tp = context.tensor_model_parallel_size
    if axis is None or tp == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=context.group)
    return torch.cat(parts[::replicas], dim=axis)


def gather_state_dict(model: nn.Module, context: Optional[ParallelContext] = None) -> Dict[str, torch.Tensor]:
    """The full (single-process) state dict of a tensor-parallel ``model``, on every TP rank (a collective).

    Parameter names are the model's own (already global within a pipeline stage); ``context`` defaults to
    ``model.context``.
    """
    context = _context_of(model, context)
    return {
        name: gather_tensor(param, tensor_parallel_axis(param), context, tensor_parallel_replicas(param))
        for name, param in model.named_parameters()
    }
