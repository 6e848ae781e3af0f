"""--profile: a torch.profiler trace of a window of training steps, written as chrome trace JSON.

With --profile, every rank in --profile-ranks (default: all, Megatron's empty list) records steps
``--profile-step-start + 1`` to ``--profile-step-end`` (1-based step numbers: the profiler starts when
``--profile-step-start`` steps are done and stops when ``--profile-step-end`` are, Megatron's nsys capture
range; defaults 10 and 12: steps 11 and 12). Each step is a ``megalign step N`` range in the trace. The trace
goes to ``torch_profile/rank-<R>.json`` in --tensorboard-dir (beside the events; else in --save, else in the
working directory), written atomically; open it in Perfetto, chrome://tracing or TensorBoard's profiler.
On a GPU the window is also a CUDA profiler capture range (cudaProfilerStart/Stop), so ``nsys profile
--capture-range=cudaProfilerApi`` records the same steps.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, Optional

import torch

from megalign.config.sections import LoggingSection

__all__ = ["StepProfiler", "trace_directory"]

TRACE_DIR = "torch_profile"


def trace_directory(logging: LoggingSection, save: Optional[str]) -> str:
    """Where traces go: ``torch_profile`` in --tensorboard-dir, else in --save, else in the working directory."""
    return os.path.join(logging.tensorboard_dir or save or os.curdir, TRACE_DIR)


class StepProfiler:
    """Profiles the configured window of steps on this rank (does nothing without --profile)."""

    def __init__(
        self,
        logging: LoggingSection,
        rank: int,
        directory: str,
        device: torch.device,
        log: Callable[[str], None] = lambda text: None,
    ) -> None:
        ranks = [int(value) for value in logging.profile_ranks or []]
        self.enabled = logging.profile and (not ranks or rank in ranks)
        self.start, self.end = logging.profile_step_start, logging.profile_step_end
        self.path = os.path.join(directory, f"rank-{rank}.json")
        self.device, self.log = device, log
        self._profiler: Optional[torch.profiler.profile] = None

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def before_step(self, done: int) -> None:
        """Called with the number of steps done before running the next one; starts the window."""
        if self.enabled and self._profiler is None and self.start <= done < self.end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.profiler.start()
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()

    def step_range(self, number: int) -> ContextManager[object]:
        """A ``megalign step N`` range around step ``number`` (1-based) while profiling."""
        if self._profiler is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(f"megalign step {number}")

    def after_step(self, done: int) -> None:
        """Called with the steps done after each step; ends the window at --profile-step-end."""
        if self._profiler is not None and done >= self.end:
            self.stop()

    def stop(self) -> None:
        """End the window now (the run stops inside it) and write the trace."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        profiler.stop()
        if self.device.type == "cuda":
            torch.cuda.profiler.stop()
        os.makedirs(os.path.dirname(self.path) or os.curdir, exist_ok=True)
        partial = f"{self.path}.partial"
        profiler.export_chrome_trace(partial)
        os.replace(partial, self.path)
        self.log(f"profile: wrote {self.path}")
