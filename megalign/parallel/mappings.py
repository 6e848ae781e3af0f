"""Autograd-aware collectives over the tensor-parallel (TP) group of a :class:`ParallelContext`.

Each function is a pair (forward, backward) of conjugate communications, so that gradients through a
tensor-parallel region are exact (Shoeybi et al., 2019; Korthikanti et al., 2022 for sequence parallelism):

=====================================  =================================  =================================
function                               forward                            backward
=====================================  =================================  =================================
copy_to_tensor_parallel                identity                           all-reduce
reduce_from_tensor_parallel            all-reduce                         identity
gather_from_tensor_parallel            all-gather, last dim               split, last dim
scatter_to_tensor_parallel             split, last dim                    all-gather, last dim
scatter_to_sequence_parallel           split, sequence dim                all-gather, sequence dim
gather_from_sequence_parallel          all-gather, sequence dim           reduce-scatter, sequence dim
reduce_scatter_to_sequence_parallel    reduce-scatter, sequence dim       all-gather, sequence dim
all_reduce_gradient                    identity                           all-reduce over a given group
=====================================  =================================  =================================

Activations are ``[batch, seq, hidden]``, so the **sequence dimension is 1** (:data:`SEQUENCE_DIM`;
Megatron's layout is ``[seq, batch, hidden]`` with dimension 0). The sequence length must be divisible
by the TP size under sequence parallelism. At TP size 1 every function is the identity and calls no
``torch.distributed`` function.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from megalign.parallel.state import ParallelContext

__all__ = [
    "SEQUENCE_DIM",
    "all_reduce_gradient",
    "copy_to_tensor_parallel",
    "gather_from_sequence_parallel",
    "gather_from_tensor_parallel",
    "reduce_from_tensor_parallel",
    "reduce_scatter_to_sequence_parallel",
    "scatter_to_sequence_parallel",
    "scatter_to_tensor_parallel",
    "sequence_parallel_parameter",
]

SEQUENCE_DIM = 1


def _size_rank(group: Any) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size, _ = _size_rank(group)
    x = x.contiguous()
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size, rank = _size_rank(group)
    if x.shape[dim] % size:
        raise ValueError(
            f"tensor parallelism: dimension {dim} of size {x.shape[dim]} (shape {tuple(x.shape)}) "
            f"must be divisible by the tensor-parallel size {size}; with --sequence-parallel the "
            f"sequence length must be a multiple of --tensor-model-parallel-size"
        )
    return x.chunk(size, dim=dim)[rank].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size, rank = _size_rank(group)
    if x.shape[dim] % size:
        _split(x, dim, group)  # raises the explanatory error
    parts = [part.contiguous() for part in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[rank])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward: sum the gradient over the group."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        return grad, None


class _Gather(torch.autograd.Function):
    """All-gather along ``dim``; backward: this rank's slice of the gradient (``reduce_grad=False``) or the
    reduce-scatter of it (``reduce_grad=True``, when every rank's output feeds a different computation)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, reduce_grad: bool) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None]:
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _Scatter(torch.autograd.Function):
    """Keep this rank's slice along ``dim`` (of the sum over ranks when ``reduce``); backward: all-gather."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, reduce: bool) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group) if reduce else _split(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None, None


def _parallel(context: ParallelContext) -> bool:
    return context.tensor_model_parallel_size > 1


def copy_to_tensor_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce of the gradient backward."""
    return _CopyToTensorParallel.apply(x, context.group) if _parallel(context) else x


def reduce_from_tensor_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Leave a TP region by summing the ranks' partial results: all-reduce forward, identity backward."""
    return _ReduceFromTensorParallel.apply(x, context.group) if _parallel(context) else x


def gather_from_tensor_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Concatenate the ranks' last-dimension shards (e.g. vocabulary-split logits); backward keeps this rank's slice."""
    return _Gather.apply(x, x.dim() - 1, context.group, False) if _parallel(context) else x


def scatter_to_tensor_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Keep this rank's last-dimension slice of a replicated input; backward all-gathers the gradient."""
    return _Scatter.apply(x, x.dim() - 1, context.group, False) if _parallel(context) else x


def scatter_to_sequence_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Keep this rank's slice of the sequence (dimension 1); backward all-gathers the gradient."""
    return _Scatter.apply(x, SEQUENCE_DIM, context.group, False) if _parallel(context) else x


def gather_from_sequence_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """All-gather the sequence shards (dimension 1) before a TP region; backward reduce-scatters the gradient
    (each rank's copy of the full sequence feeds its own shard of the weights)."""
    return _Gather.apply(x, SEQUENCE_DIM, context.group, True) if _parallel(context) else x


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Leave a TP region into the sequence-parallel region: sum the partial results and keep this rank's
    sequence slice (reduce-scatter); backward all-gathers the gradient."""
    return _Scatter.apply(x, SEQUENCE_DIM, context.group, True) if _parallel(context) else x


def all_reduce_gradient(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Identity forward; backward sums the gradient over ``group`` (None: identity).

    Applied to a parameter in ``forward``, it makes the parameter's gradient the sum of the contributions
    of every rank of ``group``: for a weight replicated over ranks that each see a different part of the
    computation (norm weights under sequence parallelism, a key/value head shared by several TP ranks).
    """
    return x if group is None else _CopyToTensorParallel.apply(x, group)


def sequence_parallel_parameter(param: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """A TP-replicated parameter used on sequence shards: its gradient is summed over the TP group when
    sequence parallelism is on (each rank saw only its part of the sequence); otherwise ``param`` as is."""
    if context.sequence_parallel and _parallel(context):
        return all_reduce_gradient(param, context.group)
    return param
