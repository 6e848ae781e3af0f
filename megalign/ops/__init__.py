"""Fused ops: one Python API per op. Today each calls its PyTorch reference (the CPU path and the test
oracle, ``*_reference`` in the op's module); GPU kernels plug in behind the same functions."""

from __future__ import annotations

from megalign.ops.cross_entropy import cross_entropy
from megalign.ops.rms_norm import rms_norm
from megalign.ops.rotary import RopeScaling, apply_rotary, rotary_cos_sin
from megalign.ops.swiglu import swiglu

__all__ = ["RopeScaling", "apply_rotary", "cross_entropy", "rms_norm", "rotary_cos_sin", "swiglu"]
