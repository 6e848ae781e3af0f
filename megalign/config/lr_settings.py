"""The settings of a learning-rate and weight-decay schedule, resolved from Megatron's flags and checked.

:meth:`LRScheduleSettings.resolve` takes the flag values (keywords are the flag destinations:
``lr_warmup_iters`` is ``--lr-warmup-iters``), turns fractions into step counts and defaults the decay
length to the training steps. Iteration-based runs (``--train-iters``) count steps in optimizer updates;
sample-based runs (``--train-samples`` with ``--lr-warmup-samples``, ``--lr-decay-samples``,
``--lr-wsd-decay-samples``) count them in samples, as Megatron's OptimizerParamScheduler does (the schedule
then advances by the global batch size per update). Mixing the two kinds of flags is a ConfigError naming
both; :meth:`LRScheduleSettings.validate` raises ConfigError naming the flag and the constraint that failed.
The configuration checks these when it is loaded; megalign.training.lr_schedule computes the schedule from
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from megalign.config.sections import DECAY_STYLES, WSD_DECAY_STYLES, OptimizationSection
from megalign.errors import ConfigError

__all__ = ["LRScheduleSettings", "STEP_UNITS", "WD_INCR_STYLES", "section_options"]

WD_INCR_STYLES = ("constant", "linear", "cosine")
STEP_UNITS = ("iterations", "samples")
# Per unit, the flags that set the warmup, decay and WSD lengths (for error messages).
_LENGTH_FLAGS = {
    "iterations": ("--lr-warmup-iters", "--lr-decay-iters (default --train-iters)", "--lr-wsd-decay-iters"),
    "samples": ("--lr-warmup-samples", "--lr-decay-samples (default --train-samples)", "--lr-wsd-decay-samples"),
}


def _check_units(train_iters: Optional[int], train_samples: Optional[int], values: Dict[str, Any]) -> str:
    """The run's step unit; ConfigError naming both flags when iteration and sample flags are mixed."""
    if train_iters is not None and train_samples is not None:
        raise ConfigError("--train-iters and --train-samples cannot be used together; give only one")
    unit = "samples" if train_samples is not None else "iterations"
    run_flag = "--train-samples" if unit == "samples" else "--train-iters"
    other = "iters" if unit == "samples" else "samples"
    for dest, value in values.items():
        if dest.endswith(f"_{other}") and value:
            flag = "--" + dest.replace("_", "-")
            mine = flag[: -len(other)] + ("samples" if unit == "samples" else "iters")
            raise ConfigError(
                f"{flag} {value} cannot be used with {run_flag} ({unit}-based training); give {mine} instead"
            )
    return unit


@dataclass
class LRScheduleSettings:
    """A schedule's settings in steps (optimizer updates); see docs/training.md for the formulas."""

    lr: float
    min_lr: float
    lr_warmup_init: float
    warmup_steps: float
    decay_steps: float
    decay_style: str
    wsd_decay_steps: Optional[float]
    wsd_decay_style: str
    start_weight_decay: float
    end_weight_decay: float
    wd_incr_steps: float
    weight_decay_incr_style: str
    step_unit: str = "iterations"  # "samples": every length above counts samples (--train-samples runs)

    @classmethod
    def resolve(
        cls,
        lr: float,
        *,
        min_lr: float = 0.0,
        lr_warmup_iters: float = 0,
        lr_warmup_fraction: Optional[float] = None,
        lr_warmup_init: float = 0.0,
        lr_decay_iters: Optional[int] = None,
        train_iters: Optional[int] = None,
        lr_decay_style: str = "linear",
        lr_wsd_decay_iters: Optional[float] = None,
        lr_wsd_decay_fraction: Optional[float] = None,
        lr_wsd_decay_style: str = "exponential",
        weight_decay: float = 0.0,
        start_weight_decay: Optional[float] = None,
        end_weight_decay: Optional[float] = None,
        weight_decay_incr_style: str = "constant",
        train_samples: Optional[int] = None,
        lr_warmup_samples: int = 0,
        lr_decay_samples: Optional[int] = None,
        lr_wsd_decay_samples: Optional[int] = None,
    ) -> "LRScheduleSettings":
        """Resolve flag values into settings (fractions into steps, defaults filled in), then validate them.

        With ``train_samples`` (and no ``train_iters``) every length is in samples (Megatron's sample-based
        schedule); the ``*_iters`` flags are then errors, as the ``*_samples`` ones are with ``train_iters``.
        """
        unit = _check_units(
            train_iters,
            train_samples,
            dict(
                lr_warmup_iters=lr_warmup_iters,
                lr_decay_iters=lr_decay_iters,
                lr_wsd_decay_iters=lr_wsd_decay_iters,
                lr_warmup_samples=lr_warmup_samples,
                lr_decay_samples=lr_decay_samples,
                lr_wsd_decay_samples=lr_wsd_decay_samples,
            ),
        )
        run_length = train_samples if unit == "samples" else train_iters
        warmup_flag = "--lr-warmup-samples" if unit == "samples" else "--lr-warmup-iters"
        wsd_flag = "--lr-wsd-decay-samples" if unit == "samples" else "--lr-wsd-decay-iters"
        warmup: float = lr_warmup_samples if unit == "samples" else lr_warmup_iters
        decay_steps = lr_decay_samples if unit == "samples" else lr_decay_iters
        if decay_steps is None:
            decay_steps = run_length
        if decay_steps is None:
            raise ConfigError("the learning-rate schedule needs --lr-decay-iters or --train-iters")
        if lr_warmup_fraction is not None:
            if warmup:
                raise ConfigError(
                    f"give only one of --lr-warmup-fraction {lr_warmup_fraction} and {warmup_flag} {warmup}"
                )
            if not 0.0 <= lr_warmup_fraction < 1.0:
                raise ConfigError(f"--lr-warmup-fraction {lr_warmup_fraction} must be in [0, 1)")
            warmup = lr_warmup_fraction * decay_steps
        style = str(lr_decay_style).lower()  # Megatron spells it WSD
        wsd_steps: Optional[float] = lr_wsd_decay_samples if unit == "samples" else lr_wsd_decay_iters
        if lr_wsd_decay_fraction is not None:
            if wsd_steps is not None:
                raise ConfigError(
                    f"give only one of --lr-wsd-decay-fraction {lr_wsd_decay_fraction} and {wsd_flag} {wsd_steps}"
                )
            if not 0.0 < lr_wsd_decay_fraction <= 1.0:
                raise ConfigError(f"--lr-wsd-decay-fraction {lr_wsd_decay_fraction} must be in (0, 1]")
            wsd_steps = lr_wsd_decay_fraction * decay_steps
        if start_weight_decay is None and end_weight_decay is None:
            start_weight_decay = end_weight_decay = weight_decay
        elif start_weight_decay is None or end_weight_decay is None:
            raise ConfigError(
                "give both --start-weight-decay and --end-weight-decay, or neither "
                "(then --weight-decay is used throughout)"
            )

        settings = cls(
            lr=float(lr),
            min_lr=float(min_lr),
            lr_warmup_init=float(lr_warmup_init),
            warmup_steps=warmup,
            decay_steps=decay_steps,
            decay_style=style,
            wsd_decay_steps=wsd_steps if style == "wsd" else None,
            wsd_decay_style=str(lr_wsd_decay_style),
            start_weight_decay=float(start_weight_decay),
            end_weight_decay=float(end_weight_decay),
            wd_incr_steps=run_length if run_length is not None else decay_steps,
            weight_decay_incr_style=str(weight_decay_incr_style),
            step_unit=unit,
        )
        settings.validate()
        return settings

    @classmethod
    def from_section(cls, optimization: OptimizationSection, train_iters: int) -> "LRScheduleSettings":
        """The settings of a run: its optimization flags and its number of optimizer steps."""
        return cls.resolve(**section_options(optimization, train_iters))

    def flag(self, length: str) -> str:
        """The flag that sets ``length`` (``"warmup"``, ``"decay"`` or ``"wsd"``) in this run's step unit."""
        return _LENGTH_FLAGS[self.step_unit][("warmup", "decay", "wsd").index(length)]

    def validate(self) -> None:
        """Check every setting; raise ConfigError naming the flag and the constraint that failed."""
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ConfigError(
                f"--lr-wsd-decay-style {self.wsd_decay_style!r} is not one of {', '.join(WSD_DECAY_STYLES)}"
            )
        if self.weight_decay_incr_style not in WD_INCR_STYLES:
            raise ConfigError(
                f"--weight-decay-incr-style {self.weight_decay_incr_style!r} is not one of {', '.join(WD_INCR_STYLES)}"
            )
        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise ConfigError(f"--lr {self.lr:g} must be a finite number >= 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr:g} must be >= 0 and must not exceed --lr {self.lr:g}")
        if not 0.0 <= self.lr_warmup_init <= self.lr:
            raise ConfigError(
                f"--lr-warmup-init {self.lr_warmup_init:g} must be >= 0 and must not exceed --lr {self.lr:g}"
            )
        if self.step_unit not in STEP_UNITS:
            raise ConfigError(f"learning-rate schedule step unit {self.step_unit!r} is not one of {STEP_UNITS}")
        warmup, decay, wsd = self.flag("warmup"), self.flag("decay"), self.flag("wsd")
        if self.decay_steps <= 0:
            raise ConfigError(f"{decay} {self.decay_steps} must be > 0")
        if not 0 <= self.warmup_steps < self.decay_steps:
            raise ConfigError(
                f"{warmup} {self.warmup_steps:g} must be >= 0 and smaller than {decay} {self.decay_steps:g}"
            )
        if self.decay_style == "wsd":
            if self.wsd_decay_steps is None:
                raise ConfigError(f"--lr-decay-style WSD needs {wsd} (or --lr-wsd-decay-fraction)")
            room = self.decay_steps - self.warmup_steps
            if not 0 < self.wsd_decay_steps <= room:
                raise ConfigError(
                    f"{wsd} {self.wsd_decay_steps:g} must be > 0 and at most {decay.split(' (')[0]} minus "
                    f"{warmup} ({room:g})"
                )
        if self.start_weight_decay < 0.0 or self.end_weight_decay < self.start_weight_decay:
            raise ConfigError(
                f"--start-weight-decay {self.start_weight_decay:g} must be >= 0 and must not exceed "
                f"--end-weight-decay {self.end_weight_decay:g}"
            )
        if self.weight_decay_incr_style == "constant" and self.start_weight_decay != self.end_weight_decay:
            raise ConfigError(
                f"--weight-decay-incr-style constant needs --start-weight-decay "
                f"{self.start_weight_decay:g} equal to --end-weight-decay {self.end_weight_decay:g}"
            )
        if self.wd_incr_steps <= 0:
            run = "--train-samples" if self.step_unit == "samples" else "--train-iters"
            raise ConfigError(f"{run} {self.wd_incr_steps} must be > 0")


def section_options(optimization: OptimizationSection, train_iters: int) -> Dict[str, Any]:
    """The :meth:`LRScheduleSettings.resolve` keywords of a run: its optimization flags and its steps.

    A run given --train-samples (not --train-iters) gets the sample-based schedule of its samples flags.
    """
    opt = optimization
    if opt.lr is None:
        raise ConfigError("--lr is required")
    sample_based = opt.train_samples is not None and opt.train_iters is None
    return dict(
        train_samples=opt.train_samples if sample_based else None,
        lr_warmup_samples=opt.lr_warmup_samples,
        lr_decay_samples=opt.lr_decay_samples,
        lr_wsd_decay_samples=opt.lr_wsd_decay_samples,
        lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_iters=opt.lr_warmup_iters,
        lr_warmup_fraction=opt.lr_warmup_fraction,
        lr_warmup_init=opt.lr_warmup_init,
        lr_decay_iters=opt.lr_decay_iters,
        train_iters=None if sample_based else train_iters,
        lr_decay_style=opt.lr_decay_style,
        lr_wsd_decay_iters=opt.lr_wsd_decay_iters,
        lr_wsd_decay_style=opt.lr_wsd_decay_style,
        weight_decay=opt.weight_decay,
    )
