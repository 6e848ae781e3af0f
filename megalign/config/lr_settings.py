"""The settings of a learning-rate and weight-decay schedule, resolved from Megatron's flags and checked.

:meth:`LRScheduleSettings.resolve` takes the flag values (keywords are the flag destinations:
``lr_warmup_iters`` is ``--lr-warmup-iters``), turns fractions into step counts and defaults the decay
length to the training steps; :meth:`LRScheduleSettings.validate` raises ConfigError naming the flag and the
constraint that failed. The configuration checks these when it is loaded; megalign.training.lr_schedule
computes the schedule from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from megalign.config.sections import DECAY_STYLES, WSD_DECAY_STYLES, OptimizationSection
from megalign.errors import ConfigError

__all__ = ["LRScheduleSettings", "WD_INCR_STYLES", "section_options"]

WD_INCR_STYLES = ("constant", "linear", "cosine")


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
    ) -> "LRScheduleSettings":
        """Resolve flag values into settings (fractions into steps, defaults filled in), then validate them."""
        decay_steps = lr_decay_iters if lr_decay_iters is not None else train_iters
        if decay_steps is None:
            raise ConfigError("the learning-rate schedule needs --lr-decay-iters or --train-iters")
        if lr_warmup_fraction is not None:
            if lr_warmup_iters:
                raise ConfigError(
                    f"give only one of --lr-warmup-fraction {lr_warmup_fraction} and "
                    f"--lr-warmup-iters {lr_warmup_iters}"
                )
            if not 0.0 <= lr_warmup_fraction < 1.0:
                raise ConfigError(f"--lr-warmup-fraction {lr_warmup_fraction} must be in [0, 1)")
            lr_warmup_iters = lr_warmup_fraction * decay_steps
        style = str(lr_decay_style).lower()  # Megatron spells it WSD
        wsd_steps = lr_wsd_decay_iters
        if lr_wsd_decay_fraction is not None:
            if lr_wsd_decay_iters is not None:
                raise ConfigError(
                    f"give only one of --lr-wsd-decay-fraction {lr_wsd_decay_fraction} and "
                    f"--lr-wsd-decay-iters {lr_wsd_decay_iters}"
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
            warmup_steps=lr_warmup_iters,
            decay_steps=decay_steps,
            decay_style=style,
            wsd_decay_steps=wsd_steps if style == "wsd" else None,
            wsd_decay_style=str(lr_wsd_decay_style),
            start_weight_decay=float(start_weight_decay),
            end_weight_decay=float(end_weight_decay),
            wd_incr_steps=train_iters if train_iters is not None else decay_steps,
            weight_decay_incr_style=str(weight_decay_incr_style),
        )
        settings.validate()
        return settings

    @classmethod
    def from_section(cls, optimization: OptimizationSection, train_iters: int) -> "LRScheduleSettings":
        """The settings of a run: its optimization flags and its number of optimizer steps."""
        return cls.resolve(**section_options(optimization, train_iters))

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
        if self.decay_steps <= 0:
            raise ConfigError(f"--lr-decay-iters (default --train-iters) {self.decay_steps} must be > 0")
        if not 0 <= self.warmup_steps < self.decay_steps:
            raise ConfigError(
                f"--lr-warmup-iters {self.warmup_steps:g} must be >= 0 and smaller than "
                f"--lr-decay-iters (default --train-iters) {self.decay_steps:g}"
            )
        if self.decay_style == "wsd":
            if self.wsd_decay_steps is None:
                raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-fraction)")
            room = self.decay_steps - self.warmup_steps
            if not 0 < self.wsd_decay_steps <= room:
                raise ConfigError(
                    f"--lr-wsd-decay-iters {self.wsd_decay_steps:g} must be > 0 and at most "
                    f"--lr-decay-iters minus --lr-warmup-iters ({room:g})"
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
            raise ConfigError(f"--train-iters {self.wd_incr_steps} must be > 0")


def section_options(optimization: OptimizationSection, train_iters: int) -> Dict[str, Any]:
    """The :meth:`LRScheduleSettings.resolve` keywords of a run: its optimization flags and its steps."""
    opt = optimization
    if opt.lr is None:
        raise ConfigError("--lr is required")
    return dict(
        lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_iters=opt.lr_warmup_iters,
        lr_warmup_fraction=opt.lr_warmup_fraction,
        lr_warmup_init=opt.lr_warmup_init,
        lr_decay_iters=opt.lr_decay_iters,
        train_iters=train_iters,
        lr_decay_style=opt.lr_decay_style,
        lr_wsd_decay_iters=opt.lr_wsd_decay_iters,
        lr_wsd_decay_style=opt.lr_wsd_decay_style,
        weight_decay=opt.weight_decay,
    )
