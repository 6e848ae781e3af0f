"""Loss scalers (Megatron DynamicGradScaler parity, unscale, NaN/Inf detection, state) and the skip tracker."""
from __future__ import annotations

import json
import types
from typing import Any, List

import pytest
import torch

from megalign.errors import ConfigError, DataFormatError, MegalignError
from megalign.training.loss_scale import (ConstantLossScaler, DynamicLossScaler, SkippedStepTracker,
                                          TooManyNonFiniteSteps, unscale_and_check)


def _megatron_dynamic_scaler(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Any:
    """Megatron's DynamicGradScaler, with its hard-coded device='cuda' tensors created on the CPU instead."""
    grad_scaler = pytest.importorskip("megatron.core.optimizer.grad_scaler")

    def cpu_tensor(*args: Any, device: Any = None, **kw: Any) -> torch.Tensor:
        return torch.tensor(*args, **kw)

    shim = types.SimpleNamespace(tensor=cpu_tensor, max=torch.max, float=torch.float)
    monkeypatch.setattr(grad_scaler, "torch", shim)
    return grad_scaler.DynamicGradScaler(**kwargs)


def _script() -> List[bool]:
    """Overflow pattern: isolated infs (hysteresis absorbs), bursts (back off), clean runs (grow), floor hits."""
    pattern = [True] + [False] * 3 + [True, True] + [False] * 8 + [True] * 5 + [False] * 12
    pattern += [True, False, True] + [False] * 4 + [True] * 40 + [False] * 25
    return pattern


@pytest.mark.megatron
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("settings", [
    dict(initial_scale=2.0 ** 32, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=4,
         hysteresis=2),
    dict(initial_scale=2.0 ** 16, min_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3,
         hysteresis=1),
    dict(initial_scale=1024.0, min_scale=1.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=5,
         hysteresis=3),
])
def test_dynamic_scale_trajectory_matches_megatron(monkeypatch: pytest.MonkeyPatch, settings: dict) -> None:
    ref = _megatron_dynamic_scaler(monkeypatch, **settings)
    ours = DynamicLossScaler(**settings)
    assert ours.scale_value == ref.scale.item()
    seen = set()
    for i, found_inf in enumerate(_script()):
        ours.update(found_inf)
        ref.update(found_inf)
        assert ours.scale_value == ref.scale.item(), f"update {i} (found_inf={found_inf})"
        state = ref.state_dict()
        assert (ours.state_dict()["growth_tracker"], ours.state_dict()["hysteresis_tracker"]) == \
            (state["growth_tracker"], state["hysteresis_tracker"])
        seen.add(ours.scale_value)
    assert len(seen) > 3  # the script really moved the scale both ways


def test_megatron_defaults() -> None:
    scaler = DynamicLossScaler()
    assert scaler.scale_value == 2.0 ** 32 and scaler.min_scale == 1.0 and scaler.growth_interval == 1000
    assert scaler.hysteresis == 2 and scaler.backoff_factor == 0.5 and scaler.growth_factor == 2.0
    scaler.update(True)
    assert scaler.scale_value == 2.0 ** 32  # hysteresis 2: the first overflow does not back off
    scaler.update(True)
    assert scaler.scale_value == 2.0 ** 31
    for _ in range(1000):
        scaler.update(False)
    assert scaler.scale_value == 2.0 ** 32


def test_scale_never_below_min() -> None:
    scaler = DynamicLossScaler(initial_scale=8.0, min_scale=2.0, hysteresis=1)
    for _ in range(10):
        scaler.update(True)
    assert scaler.scale_value == 2.0


def test_scale_and_unscale_recovers_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    reference = torch.autograd.grad((x @ weight.t()).pow(2).mean(), weight)[0]
    scaler = DynamicLossScaler(initial_scale=2.0 ** 12)
    scaler.scale((x @ weight.t()).pow(2).mean()).backward()
    assert not torch.allclose(weight.grad, reference)
    frozen = torch.nn.Parameter(torch.zeros(2))  # .grad is None: skipped
    assert scaler.unscale_and_check([weight, frozen]) is False
    torch.testing.assert_close(weight.grad, reference)


def test_unscale_plain_tensors_in_place_mixed_dtypes() -> None:
    grads = [torch.tensor([2.0, -4.0]), torch.tensor([8.0], dtype=torch.bfloat16),
             torch.tensor([16.0], dtype=torch.float16)]
    assert unscale_and_check(grads, 0.25) is False
    assert grads[0].tolist() == [0.5, -1.0] and grads[1].item() == 2.0 and grads[2].item() == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_detects_non_finite(dtype: torch.dtype, bad: float) -> None:
    clean = torch.ones(7, dtype=dtype)
    poisoned = torch.ones(1000, dtype=dtype)
    poisoned[617] = bad
    for scaler in (ConstantLossScaler(), ConstantLossScaler(128.0), DynamicLossScaler(initial_scale=2.0 ** 8)):
        assert scaler.unscale_and_check([clean.clone(), poisoned.clone()]) is True
        assert scaler.unscale_and_check([clean.clone()]) is False


def test_detects_non_finite_in_bf16_parameter_grads() -> None:
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    param.grad = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.bfloat16)
    assert ConstantLossScaler().unscale_and_check([param]) is True


def test_constant_scaler() -> None:
    scaler = ConstantLossScaler(4.0)
    loss = torch.tensor(1.5)
    assert scaler.scale(loss).item() == 6.0
    scaler.update(True)
    assert scaler.scale_value == 4.0
    assert ConstantLossScaler().scale(loss) is loss  # bf16/fp32: no multiply
    grads = [torch.tensor([8.0])]
    assert scaler.unscale_and_check(grads) is False and grads[0].item() == 2.0


def test_dynamic_state_round_trip() -> None:
    scaler = DynamicLossScaler(initial_scale=2.0 ** 20, growth_interval=5, hysteresis=3)
    for found in [True, False, False, True, True, False]:
        scaler.update(found)
    state = json.loads(json.dumps(scaler.state_dict()))
    restored = DynamicLossScaler(initial_scale=2.0 ** 20, growth_interval=5, hysteresis=3)
    restored.load_state_dict(state)
    assert restored.state_dict() == scaler.state_dict()
    for found in [False] * 7 + [True] * 4:
        scaler.update(found)
        restored.update(found)
        assert restored.scale_value == scaler.scale_value
    fresh = DynamicLossScaler()
    fresh.load_state_dict(ConstantLossScaler().state_dict())  # bf16 checkpoint resumed in fp16: keep flags
    assert fresh.scale_value == 2.0 ** 32
    with pytest.raises(DataFormatError, match="loss-scaler state"):
        fresh.load_state_dict({"kind": "dynamic", "scale": 4.0})
    with pytest.raises(DataFormatError, match="invalid values"):
        fresh.load_state_dict({"kind": "dynamic", "scale": -1.0, "growth_tracker": 0, "hysteresis_tracker": 2})


@pytest.mark.parametrize("kwargs,message", [
    (dict(initial_scale=0.0), "--initial-loss-scale 0.0 must be"),
    (dict(initial_scale=4.0, min_scale=8.0), "--min-loss-scale 8.0 must be > 0 and must not exceed"),
    (dict(growth_interval=0), "--loss-scale-window 0"),
    (dict(hysteresis=0), "--hysteresis 0"),
    (dict(backoff_factor=1.0), "backoff factor"),
    (dict(growth_factor=1.0), "growth factor"),
])
def test_dynamic_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DynamicLossScaler(**kwargs)


def test_constant_validation() -> None:
    with pytest.raises(ConfigError, match="--loss-scale -1"):
        ConstantLossScaler(-1.0)


def test_skipped_step_tracker() -> None:
    tracker = SkippedStepTracker(max_consecutive=3)
    for skipped in [True, True, False, True, False]:
        tracker.record(skipped)
    assert (tracker.total, tracker.consecutive) == (3, 0)
    tracker.record(True)
    tracker.record(True)
    state = json.loads(json.dumps(tracker.state_dict()))
    resumed = SkippedStepTracker(max_consecutive=3)
    resumed.load_state_dict(state)
    with pytest.raises(TooManyNonFiniteSteps, match=r"3 consecutive steps .*iteration 42.* loss scale 1024"
                                                    r".* 6 steps skipped in total") as info:
        resumed.record(True, iteration=42, loss_scale=1024.0)
    assert isinstance(info.value, MegalignError)
    unlimited = SkippedStepTracker()
    for _ in range(100):
        unlimited.record(True)
    assert unlimited.consecutive == 100
    with pytest.raises(ConfigError):
        SkippedStepTracker(0)
    with pytest.raises(DataFormatError):
        resumed.load_state_dict({"total": 1})
