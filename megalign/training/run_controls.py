"""Run controls of the training loop, with Megatron's meaning: --exit-duration-in-mins, --manual-gc and
--empty-unused-memory-level.

* :class:`ExitTimer`: after each step, whether the run has trained longer than --exit-duration-in-mins. Every
  rank reads its own clock and the decision is all-reduced (MAX), so all ranks stop at the same step.
* :class:`GarbageCollection`: --manual-gc turns Python's automatic collector off for the run (so collection
  pauses happen at the same points on every rank) and collects every --manual-gc-interval steps and around
  each evaluation (unless --no-manual-gc-eval); the collector is re-enabled when the run ends.
* :func:`empty_cache`: ``torch.cuda.empty_cache()`` at the points --empty-unused-memory-level asks for; on a
  CPU there is no cache to empty and nothing happens.

:class:`RunControls` bundles them with the --profile window (megalign.training.profiling) for the loop.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Callable, ContextManager, Optional

import torch

from megalign.config.sections import MiscSection
from megalign.parallel.launch import any_rank
from megalign.training.profiling import StepProfiler, trace_directory

if TYPE_CHECKING:
    from megalign.config import TrainingConfig

__all__ = ["Clock", "ExitTimer", "GarbageCollection", "RunControls", "empty_cache"]

Clock = Callable[[], float]  # seconds, monotonic


class ExitTimer:
    """Whether ``minutes`` of training have passed since :meth:`start` (None: never), agreed by all ranks."""

    def __init__(self, minutes: Optional[int], device: torch.device, clock: Clock = time.monotonic) -> None:
        self.minutes, self.device, self.clock = minutes, device, clock
        self.started = clock()

    def start(self) -> None:
        """Start counting now (the training loop begins)."""
        self.started = self.clock()

    @property
    def elapsed_minutes(self) -> float:
        return (self.clock() - self.started) / 60.0

    def expired(self) -> bool:
        """True on every rank once any rank has trained longer than the limit (a collective when one is set)."""
        if self.minutes is None:
            return False
        return any_rank(self.elapsed_minutes > self.minutes, self.device)


class GarbageCollection:
    """--manual-gc: automatic collection off while the run lasts, explicit collections at step boundaries."""

    def __init__(self, misc: MiscSection) -> None:
        self.enabled, self.interval, self.around_eval = (
            misc.manual_gc,
            misc.manual_gc_interval,
            not misc.no_manual_gc_eval,
        )
        self.collections = 0
        self._was_enabled = gc.isenabled()

    def _collect(self) -> None:
        gc.collect()
        self.collections += 1

    def start(self) -> None:
        """Disable the automatic collector and collect once (the start of Megatron's training loop)."""
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._collect()

    def after_step(self, iteration: int) -> None:
        """Collect when ``iteration`` is a multiple of --manual-gc-interval (never with interval 0)."""
        if self.enabled and self.interval and iteration % self.interval == 0:
            self._collect()

    def around_evaluation(self) -> None:
        """Collect at the start and end of an evaluation (Megatron's --manual-gc-eval, the default)."""
        if self.enabled and self.around_eval:
            self._collect()

    def close(self) -> None:
        """Give the automatic collector back (as it was before :meth:`start`)."""
        if self.enabled and self._was_enabled:
            gc.enable()


def empty_cache(level: int, needed: int, device: torch.device) -> bool:
    """``torch.cuda.empty_cache()`` when --empty-unused-memory-level ``level`` >= ``needed`` on a CUDA device;
    returns whether it ran (a CPU has no allocator cache to empty)."""
    if level < needed or device.type != "cuda":
        return False
    torch.cuda.empty_cache()
    return True


class RunControls:
    """The loop's hooks for one run: exit duration, manual GC and the profiler window (in that order)."""

    def __init__(
        self,
        config: "TrainingConfig",
        device: torch.device,
        rank: int,
        clock: Clock = time.monotonic,
        log: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.exit_timer = ExitTimer(config.misc.exit_duration_in_mins, device, clock)
        self.gc = GarbageCollection(config.misc)
        directory = trace_directory(config.logging, config.checkpointing.save)
        self.profiler = StepProfiler(config.logging, rank, directory, device, log)

    def start(self) -> None:
        """The loop begins: start the clock, turn automatic GC off (--manual-gc)."""
        self.exit_timer.start()
        self.gc.start()

    def before_step(self, done: int) -> None:
        self.profiler.before_step(done)

    def step_range(self, number: int) -> ContextManager[object]:
        return self.profiler.step_range(number)

    def after_step(self, done: int) -> None:
        self.profiler.after_step(done)
        self.gc.after_step(done)

    def time_is_up(self) -> bool:
        """--exit-duration-in-mins has passed (on any rank: every rank gets the same answer)."""
        return self.exit_timer.expired()

    def close(self) -> None:
        """The loop ended (normally or not): write a trace still open, give automatic GC back."""
        try:
            self.profiler.stop()
        finally:
            self.gc.close()
