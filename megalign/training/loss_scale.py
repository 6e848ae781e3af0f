"""Loss scaling and non-finite-step handling (Megatron --loss-scale / --initial-loss-scale semantics).

fp16 training multiplies the loss by a large scale so small gradients survive in half precision, then
divides the gradients by it before the optimizer step. :class:`DynamicLossScaler` adapts the scale: after
``hysteresis`` steps with NaN/Inf gradients (not necessarily consecutive: the count resets only at a growth
event) the scale is multiplied by ``backoff_factor`` (never below ``min_scale``); after ``growth_interval``
consecutive finite steps it is multiplied by ``growth_factor``. :class:`ConstantLossScaler` (bf16/fp32, or a
fixed --loss-scale) never changes. Either way a step with non-finite gradients is skipped, and
:class:`SkippedStepTracker` aborts training after too many skipped steps in a row.

``unscale_and_check`` reports only this rank's gradients; with model parallelism the trainer must reduce
``found_inf`` (logical or) over the model-parallel group before calling ``update``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from megalign.config.sections import PrecisionSection
from megalign.errors import ConfigError, DataFormatError, MegalignError

TensorsOrParams = Iterable[Union[torch.Tensor, torch.nn.Parameter]]


class TooManyNonFiniteSteps(MegalignError, RuntimeError):
    """Too many consecutive optimizer steps were skipped for NaN/Inf gradients; training cannot continue."""


def _collect_grads(tensors: TensorsOrParams) -> List[torch.Tensor]:
    """Gradient tensors from parameters (their ``.grad``, skipping None) or plain gradient tensors."""
    grads = []
    for tensor in tensors:
        grad = tensor.grad if isinstance(tensor, torch.nn.Parameter) else tensor
        if grad is not None:
            grads.append(grad.detach())
    return grads


def unscale_and_check(tensors: TensorsOrParams, inv_scale: float = 1.0) -> bool:
    """Multiply gradients by ``inv_scale`` in place and return True if any element is NaN or Inf.

    One fused pass per device (torch's AMP kernel, any float dtype incl. bf16/fp16); with ``inv_scale``
    1.0 the gradients are only checked, not rewritten.
    """
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for grad in _collect_grads(tensors):
        if not grad.is_floating_point():
            raise TypeError(f"gradient of dtype {grad.dtype} is not a floating-point tensor")
        by_device.setdefault(grad.device, []).append(grad)
    found = False
    for device, grads in by_device.items():
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        if inv_scale == 1.0:
            for grad in grads:
                found_inf += (~torch.isfinite(grad)).any()
        else:
            inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        found = found or bool(found_inf.item() > 0)
    return found


class LossScaler(abc.ABC):
    """Shared behaviour of loss scalers: scale the loss, unscale and check the gradients."""

    def __init__(self, scale: float, flag: str) -> None:
        if not (math.isfinite(scale) and scale > 0.0):
            raise ConfigError(f"{flag} {scale} must be a finite number > 0")
        self._scale = float(scale)

    @property
    def scale_value(self) -> float:
        """The current loss scale."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the current scale (call backward on this)."""
        return loss * self._scale if self._scale != 1.0 else loss

    def unscale_and_check(self, tensors: TensorsOrParams) -> bool:
        """Divide gradients by the scale in place; True if any is NaN/Inf (the step must then be skipped)."""
        return unscale_and_check(tensors, 1.0 / self._scale)

    def update(self, found_inf: bool) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Adjust the scale after a step (no-op for a constant scale; the caller still skips the step)."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


class ConstantLossScaler(LossScaler):
    """A fixed loss scale: 1.0 for bf16/fp32, or Megatron's --loss-scale N for fp16 without dynamic scaling."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale, "--loss-scale")

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state."""
        return {"kind": "constant", "scale": self._scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the scale comes from the flags (a checkpoint may switch scaler kind)."""


class DynamicLossScaler(LossScaler):
    """fp16 dynamic loss scale with Megatron's DynamicGradScaler trajectory.

    Defaults are Megatron's: --initial-loss-scale 2**32, --min-loss-scale 1.0, --loss-scale-window 1000,
    --hysteresis 2, backoff 0.5, growth 2.
    """

    def __init__(
        self,
        initial_scale: float = 2.0**32,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ) -> None:
        super().__init__(initial_scale, "--initial-loss-scale")
        if not 0.0 < min_scale <= initial_scale:
            raise ConfigError(
                f"--min-loss-scale {min_scale} must be > 0 and must not exceed --initial-loss-scale {initial_scale}"
            )
        if not growth_factor > 1.0:
            raise ConfigError(f"loss-scale growth factor {growth_factor} must be > 1")
        if not 0.0 < backoff_factor < 1.0:
            raise ConfigError(f"loss-scale backoff factor {backoff_factor} must be in (0, 1)")
        if growth_interval < 1:
            raise ConfigError(f"--loss-scale-window {growth_interval} must be >= 1")
        if hysteresis < 1:
            raise ConfigError(f"--hysteresis {hysteresis} must be >= 1")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        """Back off after ``hysteresis`` overflows; grow after ``growth_interval`` clean steps in a row."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale *= self.growth_factor

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: the scale and both trackers."""
        return {
            "kind": "dynamic",
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the scale and trackers; a checkpoint from a constant scaler (e.g. bf16 run) is ignored."""
        if state.get("kind") == "constant":
            return
        try:
            scale = float(state["scale"])
            growth, hysteresis = state["growth_tracker"], state["hysteresis_tracker"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(
                f"loss-scaler state is damaged or not from megalign ({exc!r}): {dict(state)}"
            ) from None
        if not (math.isfinite(scale) and scale > 0.0) or not isinstance(growth, int) or not isinstance(hysteresis, int):
            raise DataFormatError(f"loss-scaler state has invalid values: {dict(state)}")
        self._scale, self._growth_tracker, self._hysteresis_tracker = scale, growth, hysteresis


def loss_scaler_from_config(precision: PrecisionSection) -> LossScaler:
    """fp16: dynamic (or --loss-scale static) scaling; bf16/fp32: a constant scale of 1 (a no-op)."""
    p = precision
    if not p.fp16:
        return ConstantLossScaler(1.0)
    if p.loss_scale is not None:
        return ConstantLossScaler(p.loss_scale)
    return DynamicLossScaler(
        initial_scale=p.initial_loss_scale,
        min_scale=p.min_loss_scale,
        growth_interval=p.loss_scale_window,
        hysteresis=p.hysteresis,
    )


class SkippedStepTracker:
    """Counts optimizer steps skipped for NaN/Inf gradients; raises after ``max_consecutive`` in a row.

    ``max_consecutive=None`` never raises. The trainer catches :class:`TooManyNonFiniteSteps`, saves a
    checkpoint and exits with the message.
    """

    def __init__(self, max_consecutive: Optional[int] = None) -> None:
        if max_consecutive is not None and max_consecutive < 1:
            raise ConfigError(f"maximum consecutive skipped steps {max_consecutive} must be >= 1 (or unset)")
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def record(self, skipped: bool, iteration: Optional[int] = None, loss_scale: Optional[float] = None) -> None:
        """Record one step's outcome; raise TooManyNonFiniteSteps when the consecutive limit is reached."""
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            where = f" (last at iteration {iteration})" if iteration is not None else ""
            scale = f" with loss scale {loss_scale:g}" if loss_scale is not None else ""
            raise TooManyNonFiniteSteps(
                f"{self.consecutive} consecutive steps had NaN/Inf gradients{where}{scale}; "
                f"{self.total} steps skipped in total. Training diverged: lower --lr or raise "
                "--lr-warmup-iters, check the data, try bf16 instead of fp16, or resume from an earlier checkpoint"
            )

    def state_dict(self) -> Dict[str, int]:
        """JSON-serialisable counters."""
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters."""
        try:
            self.total, self.consecutive = int(state["total"]), int(state["consecutive"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataFormatError(f"skipped-step state is damaged ({exc!r}): {dict(state)}") from None
