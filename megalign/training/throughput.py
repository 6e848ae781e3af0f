"""Throughput accounting for log lines: model FLOP/s, MFU against the device's peak, and memory in use.

MFU (model FLOPs utilisation, PaLM's definition) = achieved model FLOP/s / the device's peak FLOP/s, where
model FLOPs per token come from :func:`megalign.model.flops_per_token` (forward + backward, without the
extra forward of activation recomputation, so recomputing never inflates MFU). Peak figures are the
vendors' dense (no sparsity) tensor-core numbers for bf16/fp16; fp32 training counts TF32 tensor cores,
half the bf16 figure. Devices not in the table (CPUs among them) report MFU only with --peak-tflops.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["PEAK_BF16_TFLOPS", "MemoryUsage", "ThroughputMeter", "memory_usage", "peak_tflops"]

# Dense bf16/fp16 tensor-core peak per device, TFLOP/s; matched against torch.cuda.get_device_name(),
# first match wins (so the specific names come before the general ones).
PEAK_BF16_TFLOPS: Tuple[Tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("V100", 125.0),
    ("MI300X", 1307.0),
)
_GIB = float(1 << 30)


def peak_tflops(device: torch.device, dtype: torch.dtype, override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of ``device`` for training in ``dtype``: ``override`` if given, else from the table, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops if dtype in (torch.bfloat16, torch.float16) else tflops / 2
    return None


@dataclass(frozen=True)
class MemoryUsage:
    """Memory of this process in GiB: now and the peak so far (CUDA: allocated tensors; CPU: resident set)."""

    current_gib: float
    peak_gib: float

    def describe(self) -> str:
        return f"mem {self.current_gib:.2f} GiB (peak {self.peak_gib:.2f})"


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_usage(device: torch.device) -> MemoryUsage:
    """What :class:`MemoryUsage` says for ``device``."""
    if device.type == "cuda":
        return MemoryUsage(torch.cuda.memory_allocated(device) / _GIB, torch.cuda.max_memory_allocated(device) / _GIB)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return MemoryUsage(_resident_bytes() / _GIB, peak / _GIB)


@dataclass(frozen=True)
class Rates:
    """Tokens and samples per second, model TFLOP/s per device, and MFU (None without a peak)."""

    tokens_per_s: float
    samples_per_s: float
    tflops: float
    mfu: Optional[float]


class ThroughputMeter:
    """Rates over a window of steps: tokens/s, samples/s, model TFLOP/s and MFU.

    ``flops_per_token`` is the model's training FLOPs per token; ``peak`` the device's TFLOP/s or None.
    """

    def __init__(self, flops_per_token: int, peak: Optional[float]) -> None:
        self.flops_per_token, self.peak = flops_per_token, peak

    def rates(self, tokens: int, samples: int, seconds: float) -> "Rates":
        """Throughput of ``tokens`` and ``samples`` processed in ``seconds`` (mfu None without a peak)."""
        seconds = max(seconds, 1e-9)
        tflops = tokens * self.flops_per_token / seconds / 1e12
        return Rates(
            tokens_per_s=tokens / seconds,
            samples_per_s=samples / seconds,
            tflops=tflops,
            mfu=tflops / self.peak if self.peak else None,
        )
