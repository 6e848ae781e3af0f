"""Learning-rate and weight-decay schedules with Megatron-LM's OptimizerParamScheduler semantics.

Steps count optimizer updates (iterations). After ``k`` successful updates the optimizer uses
``lr_at(k)``: linear warmup from ``--lr-warmup-init`` to ``--lr`` over ``--lr-warmup-iters`` steps, then
the decay style down to ``--min-lr`` at ``--lr-decay-iters`` (default ``--train-iters``), then ``--min-lr``
(``constant`` stays at ``--lr`` forever). Constructor keywords are the Megatron flag destinations
(``lr_warmup_iters`` is ``--lr-warmup-iters``), so a parsed namespace maps onto them directly
(:meth:`LRSchedule.from_namespace`). Formulas are documented in docs/training.md.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from megalign.errors import ConfigError, DataFormatError

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "wsd")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
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
}

_NAMESPACE_KEYS = ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_fraction", "lr_warmup_init", "lr_decay_iters",
                   "train_iters", "lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_fraction",
                   "lr_wsd_decay_style", "weight_decay", "start_weight_decay", "end_weight_decay",
                   "weight_decay_incr_style")


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
    as in Megatron). Each param group gets ``lr = lr_at(step) * group.get("lr_mult", 1)`` and
    ``weight_decay = wd_at(step) * group.get("wd_mult", 1)``.
    """

    def __init__(self, lr: float, *, min_lr: float = 0.0, lr_warmup_iters: float = 0,
                 lr_warmup_fraction: Optional[float] = None, lr_warmup_init: float = 0.0,
                 lr_decay_iters: Optional[int] = None, train_iters: Optional[int] = None,
                 lr_decay_style: str = "linear", lr_wsd_decay_iters: Optional[float] = None,
                 lr_wsd_decay_fraction: Optional[float] = None, lr_wsd_decay_style: str = "exponential",
                 weight_decay: float = 0.0, start_weight_decay: Optional[float] = None,
                 end_weight_decay: Optional[float] = None, weight_decay_incr_style: str = "constant") -> None:
        decay_steps = lr_decay_iters if lr_decay_iters is not None else train_iters
        if decay_steps is None:
            raise ConfigError("the learning-rate schedule needs --lr-decay-iters or --train-iters")
        if lr_warmup_fraction is not None:
            if lr_warmup_iters:
                raise ConfigError(f"give only one of --lr-warmup-fraction {lr_warmup_fraction} and "
                                  f"--lr-warmup-iters {lr_warmup_iters}")
            if not 0.0 <= lr_warmup_fraction < 1.0:
                raise ConfigError(f"--lr-warmup-fraction {lr_warmup_fraction} must be in [0, 1)")
            lr_warmup_iters = lr_warmup_fraction * decay_steps
        style = str(lr_decay_style).lower()  # Megatron spells it WSD
        wsd_steps = lr_wsd_decay_iters
        if lr_wsd_decay_fraction is not None:
            if lr_wsd_decay_iters is not None:
                raise ConfigError(f"give only one of --lr-wsd-decay-fraction {lr_wsd_decay_fraction} and "
                                  f"--lr-wsd-decay-iters {lr_wsd_decay_iters}")
            if not 0.0 < lr_wsd_decay_fraction <= 1.0:
                raise ConfigError(f"--lr-wsd-decay-fraction {lr_wsd_decay_fraction} must be in (0, 1]")
            wsd_steps = lr_wsd_decay_fraction * decay_steps
        if start_weight_decay is None and end_weight_decay is None:
            start_weight_decay = end_weight_decay = weight_decay
        elif start_weight_decay is None or end_weight_decay is None:
            raise ConfigError("give both --start-weight-decay and --end-weight-decay, or neither "
                              "(then --weight-decay is used throughout)")

        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_init = float(lr_warmup_init)
        self.warmup_steps: float = lr_warmup_iters
        self.decay_steps: float = decay_steps
        self.decay_style = style
        self.wsd_decay_steps: Optional[float] = wsd_steps if style == "wsd" else None
        self.wsd_decay_style = str(lr_wsd_decay_style)
        self.start_weight_decay = float(start_weight_decay)
        self.end_weight_decay = float(end_weight_decay)
        self.wd_incr_steps: float = train_iters if train_iters is not None else decay_steps
        self.weight_decay_incr_style = str(weight_decay_incr_style)
        self.num_steps = 0
        self._validate()

    @classmethod
    def from_namespace(cls, args: Any) -> "LRSchedule":
        """Build from a parsed Megatron-style argparse namespace (or any object with those attributes)."""
        return cls(**{key: getattr(args, key) for key in _NAMESPACE_KEYS if getattr(args, key, None) is not None})

    def _validate(self) -> None:
        """Check every setting; raise ConfigError naming the flag and the constraint that failed."""
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(f"--lr-wsd-decay-style {self.wsd_decay_style!r} is not one of "
                              f"{', '.join(WSD_DECAY_STYLES)}")
        if self.weight_decay_incr_style not in WD_INCR_STYLES:
            raise ConfigError(f"--weight-decay-incr-style {self.weight_decay_incr_style!r} is not one of "
                              f"{', '.join(WD_INCR_STYLES)}")
        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise ConfigError(f"--lr {self.lr:g} must be a finite number >= 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr:g} must be >= 0 and must not exceed --lr {self.lr:g}")
        if not 0.0 <= self.lr_warmup_init <= self.lr:
            raise ConfigError(f"--lr-warmup-init {self.lr_warmup_init:g} must be >= 0 and must not exceed "
                              f"--lr {self.lr:g}")
        if self.decay_steps <= 0:
            raise ConfigError(f"--lr-decay-iters (default --train-iters) {self.decay_steps} must be > 0")
        if not 0 <= self.warmup_steps < self.decay_steps:
            raise ConfigError(f"--lr-warmup-iters {self.warmup_steps:g} must be >= 0 and smaller than "
                              f"--lr-decay-iters (default --train-iters) {self.decay_steps:g}")
        if self.decay_style == "wsd":
            if self.wsd_decay_steps is None:
                raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-fraction)")
            room = self.decay_steps - self.warmup_steps
            if not 0 < self.wsd_decay_steps <= room:
                raise ConfigError(f"--lr-wsd-decay-iters {self.wsd_decay_steps:g} must be > 0 and at most "
                                  f"--lr-decay-iters minus --lr-warmup-iters ({room:g})")
        if self.start_weight_decay < 0.0 or self.end_weight_decay < self.start_weight_decay:
            raise ConfigError(f"--start-weight-decay {self.start_weight_decay:g} must be >= 0 and must not exceed "
                              f"--end-weight-decay {self.end_weight_decay:g}")
        if self.weight_decay_incr_style == "constant" and self.start_weight_decay != self.end_weight_decay:
            raise ConfigError(f"--weight-decay-incr-style constant needs --start-weight-decay "
                              f"{self.start_weight_decay:g} equal to --end-weight-decay {self.end_weight_decay:g}")
        if self.wd_incr_steps <= 0:
            raise ConfigError(f"--train-iters {self.wd_incr_steps} must be > 0")

    def lr_at(self, step: float) -> float:
        """Base learning rate after ``step`` optimizer updates (before any per-group ``lr_mult``)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr_warmup_init + (self.lr - self.lr_warmup_init) * float(step) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return self.lr
        if step > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            scaled = self.lr * max(self.warmup_steps, 1) ** 0.5 / (max(step, 1) ** 0.5)
            return max(self.min_lr, scaled)
        ratio = float(step - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        if self.decay_style == "wsd":
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if step <= anneal_start:
                coeff = 1.0
            else:
                coeff = _decay_coeff(self.wsd_decay_style,
                                     float(step - anneal_start) / float(self.wsd_decay_steps))
        else:
            coeff = _decay_coeff(self.decay_style, ratio)
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def wd_at(self, step: float) -> float:
        """Base weight decay after ``step`` updates (before any per-group ``wd_mult``)."""
        if step > self.wd_incr_steps or self.weight_decay_incr_style == "constant":
            return self.end_weight_decay
        ratio = float(step) / float(self.wd_incr_steps)
        return self.start_weight_decay + _incr_coeff(self.weight_decay_incr_style, ratio) * (
            self.end_weight_decay - self.start_weight_decay)

    @property
    def current_lr(self) -> float:
        """Base learning rate at the current step."""
        return self.lr_at(self.num_steps)

    def apply(self, optimizer: Any) -> float:
        """Write the current lr and weight decay into every param group of ``optimizer``; return the base lr."""
        lr, wd = self.lr_at(self.num_steps), self.wd_at(self.num_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return lr

    def step(self, optimizer: Any = None, increment: int = 1) -> float:
        """Advance ``increment`` updates and apply the new values to ``optimizer`` (if given); return the lr."""
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
        missing = [key for key in ("format", "num_steps", *_SETTINGS) if key not in state]
        if missing:
            raise DataFormatError(f"learning-rate scheduler state lacks {', '.join(missing)}; "
                                  "the checkpoint is damaged or was not written by megalign")
        if state["format"] != STATE_FORMAT:
            raise DataFormatError(f"learning-rate scheduler state has format {state['format']!r}; "
                                  f"this version reads format {STATE_FORMAT}")
        if policy == "strict":
            for key, flag in _SETTINGS.items():
                if key == "wd_incr_steps" and self.weight_decay_incr_style == "constant":
                    continue  # only a ramping weight decay depends on the run length
                if state[key] != getattr(self, key):
                    raise ConfigError(
                        f"{flag} is {getattr(self, key)!r} but the checkpoint was trained with {state[key]!r}; "
                        "pass the same value when resuming (to stop early and resume later, set "
                        "--lr-decay-iters to the full run's length)")
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
        return (f"LRSchedule(lr={self.lr:g}, min_lr={self.min_lr:g}, style={self.decay_style}, "
                f"warmup={self.warmup_steps:g}, decay={self.decay_steps:g}, step={self.num_steps})")
