"""RMSNorm (Zhang & Sennrich, 2019) as LLaMA and Qwen2 use it.

``y = weight * (x / sqrt(mean(x**2, -1) + eps))``: the statistics are computed in fp32 whatever the
input dtype, the normalised activations are cast back to ``x.dtype`` and then scaled by ``weight``
(the order Hugging Face's ``LlamaRMSNorm`` uses, so bf16 results match it).

``zero_centered`` (Megatron's --apply-layernorm-1p): the stored weight is ``w - 1`` and the scale is
``1 + weight``, formed in fp32 and then cast like a plain weight, so it equals a plain RMSNorm of weight
``1 + weight`` (what an export writes).
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """PyTorch reference: the CPU path and the oracle for fused kernels. Returns ``x.dtype``."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight shape {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}"
        )
    if zero_centered:
        weight = weight.float() + 1.0
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight.to(x.dtype) * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, zero_centered: bool = False) -> torch.Tensor:
    """Normalise the last dimension of ``x`` by its root mean square and scale by ``weight`` (``1 + weight`` when
    ``zero_centered``).

    x: ``[..., hidden]`` of any floating dtype; weight: ``[hidden]``. Output has ``x``'s shape and dtype.
    """
    return rms_norm_reference(x, weight, eps, zero_centered)
