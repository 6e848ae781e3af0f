"""Token-level cross-entropy computed in fp32 with a numerically stable log-sum-exp.

``loss_i = logsumexp(logits_i) - logits_i[label_i]`` where ``logsumexp(z) = max(z) + log(sum(exp(z - max(z))))``.
Positions whose label equals ``ignore_index`` contribute nothing: 0 in ``reduction="none"``, left out of
the sum, and left out of the count that ``"mean"`` divides by. Unlike ``torch.nn.functional.cross_entropy``,
``"mean"`` over a batch with no valid label returns 0 (not NaN), so an all-prompt SFT micro-batch cannot
poison a step, and the result is always fp32 whatever the logits dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "cross_entropy_reference", "reduce_token_losses"]

_REDUCTIONS = ("mean", "sum", "none")


def _checked_valid_labels(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    check_range: bool,
    vocab: Optional[int] = None,
) -> torch.Tensor:
    """Validate the arguments (ValueError naming the problem); return the mask of labels that count.

    ``vocab``: the vocabulary size labels are checked against (default: the logits' last dimension).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction={reduction!r}; use one of {', '.join(_REDUCTIONS)}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} "
            f"plus a vocabulary dimension"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    valid = labels != ignore_index
    if check_range:  # a host sync on a GPU
        vocab = logits.shape[-1] if vocab is None else vocab
        bad = valid & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"cross_entropy: label {first} is outside the vocabulary [0, {vocab}) "
                f"and is not ignore_index={ignore_index}"
            )
    return valid


def cross_entropy_reference(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """PyTorch reference: explicit log-sum-exp, the oracle for the fast path and for fused kernels.

    It checks that every non-ignored label is inside the vocabulary (a host sync on a GPU).
    """
    valid = _checked_valid_labels(logits, labels, ignore_index, reduction, check_range=True)
    z = logits.float()
    zmax = z.amax(dim=-1, keepdim=True).detach()
    lse = (zmax + torch.log(torch.exp(z - zmax).sum(dim=-1, keepdim=True))).squeeze(-1)
    target = torch.gather(z, -1, torch.where(valid, labels, 0).unsqueeze(-1).long()).squeeze(-1)
    return reduce_token_losses(torch.where(valid, lse - target, torch.zeros_like(lse)), valid, reduction)


def reduce_token_losses(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-position losses (0 where not ``valid``) as they are (``"none"``), summed, or averaged over the
    valid positions (0 when there are none)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[..., vocab]`` (any float dtype) against integer ``labels`` ``[...]``.

    Returns fp32: per position for ``reduction="none"``, else a scalar (``"sum"``, or ``"mean"`` over
    the positions whose label is not ``ignore_index``, 0 when there are none). Runs torch's fused
    ``log_softmax`` + ``nll_loss`` kernels on fp32 logits (fewer logits-sized temporaries than the reference);
    labels outside the vocabulary raise ValueError, except under torch.compile, where the check (a host
    sync) is left to the kernel.
    """
    valid = _checked_valid_labels(
        logits, labels, ignore_index, reduction, check_range=not torch.compiler.is_compiling()
    )
    vocab = logits.shape[-1]
    flat = F.cross_entropy(
        logits.float().reshape(-1, vocab),
        labels.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction="none" if reduction == "none" else "sum",
    )
    if reduction == "none":
        return flat.reshape(labels.shape)
    if reduction == "sum":
        return flat
    return flat / valid.sum().clamp(min=1).to(flat.dtype)
