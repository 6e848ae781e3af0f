"""SwiGLU gating of the LLaMA/Qwen2 MLP (Shazeer, 2020): ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu", "swiglu_reference"]


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: the CPU path and the oracle for fused kernels (computed in the input dtype)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise; ``gate`` and ``up`` are the two halves of the MLP up-projection."""
    return swiglu_reference(gate, up)
