"""Learning-rate and weight-decay schedules with Megatron-LM's OptimizerParamScheduler semantics.

Steps count optimizer updates (iterations). After ``k`` successful updates the optimizer uses
``lr_at(k)``: linear warmup from ``--lr-warmup-init`` to ``--lr`` over ``--lr-warmup-iters`` steps, then
the decay style down to ``--min-lr`` at ``--lr-decay-iters`` (default ``--train-iters``), then ``--min-lr``
(``constant`` stays at ``--lr`` forever). Constructor keywords are the Megatron flag destinations
(``lr_warmup_iters`` is ``--lr-warmup-iters``); a run builds its schedule from its optimization section
(:meth:`LRSchedule.from_config`). The settings are resolved and checked by
megalign.config.lr_settings; this module computes the rates. Formulas are documented in docs/training.md.

Sample-based runs (``--train-samples``, ``--lr-warmup-samples``, ``--lr-decay-samples``) count steps in
samples: each update advances the schedule by the global batch size (:attr:`LRSchedule.increment`), as
Megatron does. A param group with ``max_lr``/``min_lr`` keys (the ``--decoupled-lr`` groups) follows the
same schedule between its own peak and floor, as in Megatron's ``get_lr(param_group)``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from megalign.config.lr_settings import LRScheduleSettings, section_options
from megalign.config.sections import OptimizationSection
from megalign.errors import ConfigError, DataFormatError

LOAD_POLICIES = ("strict", "use-checkpoint", "override")
STATE_FORMAT = 1

# Scheduler settings stored in state_dict(), with the flag that sets each one (for error messages).
_SETTINGS: Dict[str, str] = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_init": "--lr-warmup-init",
    "warmup_steps": "--lr-warmup-iters/--lr-warmup-fraction",
    "decay_steps": "--lr-decay-iters",
    "decay_style": "--lr-decay-style",
    "wsd_decay_steps": "--lr-wsd-decay-iters",
    "wsd_decay_style": "--lr-wsd-decay-style",
    "start_weight_decay": "--start-weight-decay",
    "end_weight_decay": "--end-weight-decay",
    "wd_incr_steps": "--train-iters (weight-decay increment steps)",
    "weight_decay_incr_style": "--weight-decay-incr-style",
    "step_unit": "--train-iters/--train-samples (the schedule's step unit)",
}
_DEFAULTS = {"step_unit": "iterations"}  # settings that checkpoints written before them lack


def _decay_coeff(style: str, ratio: float) -> float:
    """Multiplier of (lr - min_lr) at decay progress ``ratio`` in [0, 1] (linear, cosine, and WSD anneals)."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * math.pow(0.5, ratio) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ConfigError(f"unknown decay style {style!r}")  # guarded by _validate; reached only by a bug


def _incr_coeff(style: str, ratio: float) -> float:
    """Fraction of the way from start to end weight decay at ``ratio`` in [0, 1] (linear or cosine)."""
    if style == "linear":
        return ratio
    return 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)


class LRSchedule:
    """Warmup + decay learning-rate schedule and weight-decay increment schedule (Megatron semantics).

    Use: ``sched.apply(optimizer)`` once before training, then ``sched.step(optimizer)`` after every
    *successful* optimizer update (a step skipped for non-finite gradients does not advance the schedule,
    as in Megatron). Each param group gets ``lr = lr_at(step, group.get("max_lr"), group.get("min_lr")) *
    group.get("lr_mult", 1)`` and ``weight_decay = wd_at(step) * group.get("wd_mult", 1)``.

    ``global_batch_size``: samples per update; a sample-based schedule advances by it per :meth:`step`
    (:attr:`increment`), an iteration-based one by 1.
    """

    def __init__(self, lr: float, global_batch_size: int = 1, **settings: Any) -> None:
        """``settings``: the keywords of :meth:`LRScheduleSettings.resolve` (Megatron's flag destinations:
        ``min_lr``, ``lr_warmup_iters``, ``lr_decay_style``, ``train_iters``, ``train_samples``, ...)."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self._adopt(LRScheduleSettings.resolve(lr, **settings))
        self.global_batch_size = int(global_batch_size)
        self.num_steps = 0

    @classmethod
    def from_config(
        cls, optimization: OptimizationSection, train_iters: int, global_batch_size: int = 1
    ) -> "LRSchedule":
        """The schedule of a run: its optimization section, its optimizer steps and samples per step."""
        return cls(global_batch_size=global_batch_size, **section_options(optimization, train_iters))

    @property
    def increment(self) -> int:
        """Schedule steps per optimizer update: the global batch size when counting samples, else 1."""
        return self.global_batch_size if self.step_unit == "samples" else 1

    def _adopt(self, settings: LRScheduleSettings) -> None:
        """Take every setting of ``settings`` as an attribute (what lr_at, wd_at and state_dict read)."""
        self.lr = settings.lr
        self.min_lr = settings.min_lr
        self.lr_warmup_init = settings.lr_warmup_init
        self.warmup_steps: float = settings.warmup_steps
        self.decay_steps: float = settings.decay_steps
        self.decay_style = settings.decay_style
        self.wsd_decay_steps: Optional[float] = settings.wsd_decay_steps
        self.wsd_decay_style = settings.wsd_decay_style
        self.start_weight_decay = settings.start_weight_decay
        self.end_weight_decay = settings.end_weight_decay
        self.wd_incr_steps: float = settings.wd_incr_steps
        self.weight_decay_incr_style = settings.weight_decay_incr_style
        self.step_unit = settings.step_unit

    def _validate(self) -> None:
        """Check the current settings (ConfigError names the flag)."""
        LRScheduleSettings(**{key: getattr(self, key) for key in _SETTINGS}).validate()

    def lr_at(self, step: float, max_lr: Optional[float] = None, min_lr: Optional[float] = None) -> float:
        """Base learning rate after ``step`` schedule steps (before any per-group ``lr_mult``).

        ``max_lr``/``min_lr`` replace ``--lr``/``--min-lr`` (a ``--decoupled-lr`` group's own peak and floor).
        """
        peak = self.lr if max_lr is None else max_lr
        floor = self.min_lr if min_lr is None else min_lr
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr_warmup_init + (peak - self.lr_warmup_init) * float(step) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return peak
        if step > self.decay_steps:
            return floor
        if self.decay_style == "inverse-square-root":
            scaled = peak * max(self.warmup_steps, 1) ** 0.5 / (max(step, 1) ** 0.5)
            return max(floor, scaled)
        ratio = float(step - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        if self.decay_style == "wsd" and self.wsd_decay_steps is not None:  # WSD always has its steps (validated)
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if step <= anneal_start:
                coeff = 1.0
            else:
                coeff = _decay_coeff(self.wsd_decay_style, float(step - anneal_start) / float(self.wsd_decay_steps))
        else:
            coeff = _decay_coeff(self.decay_style, ratio)
        return floor + coeff * (peak - floor)

    def wd_at(self, step: float) -> float:
        """Base weight decay after ``step`` updates (before any per-group ``wd_mult``)."""
        if step > self.wd_incr_steps or self.weight_decay_incr_style == "constant":
            return self.end_weight_decay
        ratio = float(step) / float(self.wd_incr_steps)
        return self.start_weight_decay + _incr_coeff(self.weight_decay_incr_style, ratio) * (
            self.end_weight_decay - self.start_weight_decay
        )

    @property
    def current_lr(self) -> float:
        """Base learning rate at the current step."""
        return self.lr_at(self.num_steps)

    def apply(self, optimizer: Any) -> float:
        """Write the current lr and weight decay into every param group of ``optimizer``; return the base lr."""
        lr, wd = self.lr_at(self.num_steps), self.wd_at(self.num_steps)
        for group in optimizer.param_groups:
            own = self.lr_at(self.num_steps, group.get("max_lr"), group.get("min_lr"))
            group["lr"] = own * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return lr

    def step(self, optimizer: Any = None, increment: Optional[int] = None) -> float:
        """Advance ``increment`` schedule steps (default :attr:`increment`: one update) and apply the new
        values to ``optimizer`` (if given); return the base lr."""
        if increment is None:
            increment = self.increment
        if increment < 0:
            raise ValueError(f"increment must be >= 0, got {increment}")
        self.num_steps += increment
        return self.apply(optimizer) if optimizer is not None else self.current_lr

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: every setting plus the step counter."""
        state: Dict[str, Any] = {"format": STATE_FORMAT, "num_steps": self.num_steps}
        state.update({key: getattr(self, key) for key in _SETTINGS})
        return state

    def load_state_dict(self, state: Mapping[str, Any], policy: str = "strict") -> None:
        """Restore the step counter (and settings) from :meth:`state_dict` output.

        ``policy``: ``"strict"`` (default) requires the checkpoint's settings to equal this schedule's and
        raises ConfigError naming the first differing flag; ``"use-checkpoint"`` adopts the checkpoint's
        settings (Megatron --use-checkpoint-opt_param-scheduler); ``"override"`` keeps this schedule's settings
        and takes only the step counter (--override-opt_param-scheduler).
        """
        if policy not in LOAD_POLICIES:
            raise ValueError(f"policy must be one of {LOAD_POLICIES}, got {policy!r}")
        state = {**_DEFAULTS, **state}
        missing = [key for key in ("format", "num_steps", *_SETTINGS) if key not in state]
        if missing:
            raise DataFormatError(
                f"learning-rate scheduler state lacks {', '.join(missing)}; "
                "the checkpoint is damaged or was not written by megalign"
            )
        if state["format"] != STATE_FORMAT:
            raise DataFormatError(
                f"learning-rate scheduler state has format {state['format']!r}; "
                f"this version reads format {STATE_FORMAT}"
            )
        if policy == "strict":
            for key, flag in _SETTINGS.items():
                if key == "wd_incr_steps" and self.weight_decay_incr_style == "constant":
                    continue  # only a ramping weight decay depends on the run length
                if state[key] != getattr(self, key):
                    raise ConfigError(
                        f"{flag} is {getattr(self, key)!r} but the checkpoint was trained with {state[key]!r}; "
                        "pass the same value when resuming (to stop early and resume later, set "
                        "--lr-decay-iters to the full run's length)"
                    )
        elif policy == "use-checkpoint":
            previous = {key: getattr(self, key) for key in _SETTINGS}
            for key in _SETTINGS:
                setattr(self, key, state[key])
            try:
                self._validate()
            except ConfigError:
                for key, value in previous.items():
                    setattr(self, key, value)
                raise
        num_steps = state["num_steps"]
        if not isinstance(num_steps, int) or num_steps < 0:
            raise DataFormatError(f"learning-rate scheduler state has invalid num_steps {num_steps!r}")
        self.num_steps = num_steps

    def __repr__(self) -> str:
        return (
            f"LRSchedule(lr={self.lr:g}, min_lr={self.min_lr:g}, style={self.decay_style}, "
            f"warmup={self.warmup_steps:g}, decay={self.decay_steps:g}, step={self.num_steps} {self.step_unit})"
        )
