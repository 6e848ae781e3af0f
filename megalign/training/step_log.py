"""What the trainer reports: console lines every --log-interval steps and TensorBoard scalars.

Console (one line per interval, means over the interval's steps)::

    step 20/200 | loss 6.123456 | lr 3.0000e-04 | grad norm 1.2345 | loss scale 1 | skipped 0 |
    41.2k tokens/s | 80.4 samples/s | 0.53 TFLOP/s | MFU 41.2% | mem 1.23 GiB (peak 1.50) | ETA 0:01:23

The model TFLOP/s per device and MFU fields (console and TensorBoard) come with ``log_throughput``
(--log-throughput, as Megatron prints its throughput only then).

TensorBoard (every --tensorboard-log-interval steps, Megatron's tag names): ``lm loss``, ``learning-rate``,
``grad-norm``, ``loss-scale``, ``skipped-steps`` (running total), ``tokens-per-second``,
``samples-per-second``, ``tflops`` and ``mfu`` (with --log-throughput; ``mfu`` with a peak),
``mem-allocated-gib``, ``mem-peak-gib``;
validation: ``lm loss validation`` and ``lm loss validation ppl``. The events are written with
``torch.utils.tensorboard.SummaryWriter``, imported only when a TensorBoard directory is given.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, List, Mapping, Optional, TextIO

import torch

from megalign.errors import ConfigError
from megalign.training.throughput import Rates, ThroughputMeter, memory_usage
from megalign.utils.progress import format_count, format_duration

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["StepLogger", "open_summary_writer", "perplexity"]

TENSORBOARD_MISSING = "--tensorboard-dir needs the tensorboard package (pip install tensorboard)"


def open_summary_writer(log_dir: str) -> "SummaryWriter":
    """A ``SummaryWriter`` writing a new event file into ``log_dir`` (created if missing).

    Raises ConfigError when the tensorboard package cannot be imported or ``log_dir`` is not a directory.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(f"{TENSORBOARD_MISSING}: {exc}") from exc
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ConfigError(f"--tensorboard-dir {log_dir!r} exists and is not a directory; pass a directory path")
    return SummaryWriter(log_dir=log_dir)


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinity where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf


class StepLogger:
    """Accumulates per-step metrics and writes them to ``stream`` and (optionally) TensorBoard.

    ``tokens_per_step``/``samples_per_step``: one global batch; ``meter`` turns them into rates and MFU;
    ``log_throughput``: report TFLOP/s and MFU.
    """

    def __init__(
        self,
        stream: TextIO,
        device: torch.device,
        meter: ThroughputMeter,
        tokens_per_step: int,
        samples_per_step: int,
        total_steps: int,
        log_interval: int,
        tensorboard_dir: Optional[str] = None,
        tensorboard_interval: int = 1,
        log_throughput: bool = True,
    ) -> None:
        self.stream, self.device, self.meter = stream, device, meter
        self.log_throughput = log_throughput
        self.tokens_per_step, self.samples_per_step = tokens_per_step, samples_per_step
        self.total_steps, self.log_interval, self.tensorboard_interval = total_steps, log_interval, tensorboard_interval
        self.tensorboard = open_summary_writer(tensorboard_dir) if tensorboard_dir else None
        self._reset()
        self.run_started, self.run_steps = time.monotonic(), 0
        self.skipped_total = 0

    def _reset(self) -> None:
        self.losses: List[float] = []
        self.norms: List[float] = []
        self.skipped = 0
        self.window_started, self.window_steps = time.monotonic(), 0

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: Optional[float],
        skipped: bool,
        loss_scale: float,
        force: bool = False,
    ) -> None:
        """Record optimizer step ``step``; print the interval's line when it ends (or ``force``)."""
        self.window_steps += 1
        self.run_steps += 1
        if skipped:
            self.skipped += 1
            self.skipped_total += 1
        else:
            self.losses.append(loss)
            self.norms.append(grad_norm if grad_norm is not None else math.nan)
        if self.tensorboard is not None and step % self.tensorboard_interval == 0:
            self._tensorboard_step(step, loss, lr, grad_norm, skipped, loss_scale)
        if step % self.log_interval == 0 or force:
            self.print(self._line(step, lr, loss_scale))
            self._reset()

    def _rates(self) -> Rates:
        seconds = time.monotonic() - self.window_started
        steps = self.window_steps
        return self.meter.rates(self.tokens_per_step * steps, self.samples_per_step * steps, seconds)

    def _line(self, step: int, lr: float, loss_scale: float) -> str:
        mean = sum(self.losses) / len(self.losses) if self.losses else math.nan
        norm = sum(self.norms) / len(self.norms) if self.norms else math.nan
        rates = self._rates()
        throughput = ""
        if self.log_throughput:
            mfu = f"MFU {rates.mfu:.1%}" if rates.mfu is not None else "MFU n/a (--peak-tflops)"
            throughput = f"{rates.tflops:.3g} TFLOP/s | {mfu} | "
        eta = (time.monotonic() - self.run_started) / self.run_steps * (self.total_steps - step)
        return (
            f"step {step}/{self.total_steps} | loss {mean:.6f} | lr {lr:.4e} | grad norm {norm:.4f} | "
            f"loss scale {loss_scale:g} | skipped {self.skipped} | {format_count(rates.tokens_per_s)} tokens/s "
            f"| {rates.samples_per_s:.1f} samples/s | {throughput}"
            f"{memory_usage(self.device).describe()} | ETA {format_duration(eta)}"
        )

    def _tensorboard_step(
        self, step: int, loss: float, lr: float, grad_norm: Optional[float], skipped: bool, loss_scale: float
    ) -> None:
        rates, memory = self._rates(), memory_usage(self.device)
        scalars = {
            "learning-rate": lr,
            "loss-scale": loss_scale,
            "skipped-steps": self.skipped_total,
            "tokens-per-second": rates.tokens_per_s,
            "samples-per-second": rates.samples_per_s,
            "mem-allocated-gib": memory.current_gib,
            "mem-peak-gib": memory.peak_gib,
        }
        if not skipped:
            scalars["lm loss"] = loss
            if grad_norm is not None:
                scalars["grad-norm"] = grad_norm
        if self.log_throughput:
            scalars["tflops"] = rates.tflops
            if rates.mfu is not None:
                scalars["mfu"] = rates.mfu
        self._add_scalars(scalars, step)

    def _add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """One scalar event per tag at ``step``, all with the same wall time.

        Not ``SummaryWriter.add_scalars``: that writes each tag to its own sub-directory's event file.
        """
        assert self.tensorboard is not None
        wall_time = time.time()
        for tag, value in scalars.items():
            self.tensorboard.add_scalar(tag, value, step, walltime=wall_time)

    def validation(self, step: int, loss: float) -> None:
        """Report a validation loss (and its perplexity) at ``step``."""
        ppl = perplexity(loss)
        self.print(f"validation at step {step} | loss {loss:.6f} | perplexity {ppl:.3f}")
        if self.tensorboard is not None:
            self._add_scalars({"lm loss validation": loss, "lm loss validation ppl": ppl}, step)
            self.tensorboard.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard event file (its events are on disk when this returns); idempotent."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
