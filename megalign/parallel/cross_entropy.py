"""Cross-entropy of logits split over the vocabulary across tensor-parallel ranks, without gathering them.

Rank ``r`` holds logits ``z[..., r * V/tp : (r + 1) * V/tp]``. With ``m = max_all(z)`` (all-reduce MAX),
``s = sum_all(exp(z - m))`` (all-reduce SUM) and ``t = z[label] - m`` (only the owning rank contributes;
all-reduce SUM), ``loss = log(s) - t``: exactly :func:`megalign.ops.cross_entropy`, stable for any logits.
Three all-reduces of ``[batch, seq]`` values instead of an all-gather of ``[batch, seq, vocab]`` logits.

The backward pass is local: ``d loss / d z = softmax(z) - onehot(label)`` on this rank's slice, scaled by
the incoming gradient (zero for ignored positions). Semantics equal :func:`megalign.ops.cross_entropy`:
fp32 result, ``ignore_index`` positions contribute 0 and are left out of the ``"mean"`` count, ``"mean"``
of nothing is 0, labels outside the (global) vocabulary are a ValueError.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from megalign.ops import cross_entropy
from megalign.ops.cross_entropy import _checked_valid_labels, reduce_token_losses
from megalign.parallel.state import ParallelContext

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, group: Any, vocab_start: int
    ) -> torch.Tensor:
        z = logits.float()
        zmax = z.amax(dim=-1)
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
        z = z - zmax.unsqueeze(-1)
        local = labels.long() - vocab_start
        mine = valid & (local >= 0) & (local < z.shape[-1])
        local = torch.where(mine, local, torch.zeros_like(local))
        target = torch.gather(z, -1, local.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(target, group=group)
        exp = z.exp_()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        loss = torch.where(valid, total.log() - target, torch.zeros_like(total))
        softmax = exp.div_(total.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
        softmax, local, mine, valid = ctx.saved_tensors
        grad_logits = softmax.clone()
        hit = mine.unsqueeze(-1).to(grad_logits.dtype)
        onehot = torch.zeros_like(grad_logits).scatter_(-1, local.unsqueeze(-1), hit)
        grad_logits.sub_(onehot).mul_((grad.float() * valid).unsqueeze(-1))
        return grad_logits.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    context: ParallelContext,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of this rank's vocabulary slice of the logits ``[..., vocab / tp]`` against the global
    integer ``labels`` ``[...]`` (identical on every TP rank); the result is identical on every TP rank.

    At tensor-parallel size 1 this is :func:`megalign.ops.cross_entropy`.
    """
    tp = context.tensor_model_parallel_size
    if tp == 1:
        return cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    valid = _checked_valid_labels(
        logits,
        labels,
        ignore_index,
        reduction,
        check_range=not torch.compiler.is_compiling(),
        vocab=logits.shape[-1] * tp,
    )
    loss = _VocabParallelCrossEntropy.apply(
        logits, labels, valid, context.group, context.tensor_model_parallel_rank * logits.shape[-1]
    )
    return reduce_token_losses(loss, valid, reduction)
