"""LRSchedule: Megatron OptimizerParamScheduler parity step by step, hand-computed values, resume, validation."""
from __future__ import annotations

import json
import math
from typing import Any, Dict

import pytest
import torch

from megalign.errors import ConfigError, DataFormatError
from megalign.training.lr_schedule import LRSchedule


def _optimizer(groups: int = 1, **extra: Any) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], **extra} for _ in range(groups)]
    return torch.optim.SGD(params, lr=0.123)


# (our kwargs, number of steps to walk); Megatron settings are derived from ours in _megatron().
SETTINGS = [
    (dict(lr=3e-4, min_lr=3e-5, train_iters=50, lr_decay_style="constant", lr_warmup_iters=5), 60),
    (dict(lr=1e-3, min_lr=1e-5, train_iters=40, lr_decay_style="linear"), 50),
    (dict(lr=1e-3, min_lr=1e-5, train_iters=40, lr_decay_iters=30, lr_decay_style="linear", lr_warmup_iters=7,
          lr_warmup_init=1e-4), 45),
    (dict(lr=6e-4, min_lr=6e-5, train_iters=100, lr_decay_style="cosine", lr_warmup_iters=10), 110),
    (dict(lr=6e-4, min_lr=0.0, train_iters=97, lr_decay_style="cosine", lr_warmup_fraction=0.13), 105),
    (dict(lr=1e-3, min_lr=1e-4, train_iters=80, lr_decay_style="inverse-square-root", lr_warmup_iters=9), 90),
    (dict(lr=1e-3, min_lr=0.0, train_iters=20, lr_decay_style="inverse-square-root"), 25),
    (dict(lr=2e-4, min_lr=2e-5, train_iters=60, lr_decay_style="WSD", lr_warmup_iters=6, lr_wsd_decay_iters=20,
          lr_wsd_decay_style="linear"), 70),
    (dict(lr=2e-4, min_lr=2e-5, train_iters=60, lr_decay_style="wsd", lr_warmup_iters=6, lr_wsd_decay_iters=17,
          lr_wsd_decay_style="cosine"), 70),
    (dict(lr=2e-4, min_lr=1e-6, train_iters=60, lr_decay_style="WSD", lr_wsd_decay_fraction=0.25,
          lr_wsd_decay_style="exponential"), 70),
    (dict(lr=2e-4, min_lr=1e-6, train_iters=64, lr_decay_style="WSD", lr_warmup_fraction=0.1,
          lr_wsd_decay_iters=30, lr_wsd_decay_style="minus_sqrt"), 70),
    (dict(lr=1e-3, min_lr=1e-5, train_iters=50, lr_decay_style="cosine", lr_warmup_iters=5,
          start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="cosine"), 60),
    (dict(lr=1e-3, min_lr=1e-5, train_iters=50, lr_decay_style="linear", start_weight_decay=0.01,
          end_weight_decay=0.1, weight_decay_incr_style="linear"), 60),
]


def _megatron(ours: LRSchedule, optimizer: torch.optim.Optimizer) -> Any:
    """Megatron's scheduler with the same settings (its step unit = one of our iterations)."""
    sched_mod = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    return sched_mod.OptimizerParamScheduler(
        optimizer, init_lr=ours.lr_warmup_init, max_lr=ours.lr, min_lr=ours.min_lr,
        lr_warmup_steps=ours.warmup_steps, lr_decay_steps=ours.decay_steps,
        lr_decay_style="WSD" if ours.decay_style == "wsd" else ours.decay_style,
        start_wd=ours.start_weight_decay, end_wd=ours.end_weight_decay, wd_incr_steps=ours.wd_incr_steps,
        wd_incr_style=ours.weight_decay_incr_style, wsd_decay_steps=ours.wsd_decay_steps,
        lr_wsd_decay_style=ours.wsd_decay_style)


@pytest.mark.megatron
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kwargs,steps", SETTINGS,
                         ids=[f"{kw['lr_decay_style']}-{i}" for i, (kw, _) in enumerate(SETTINGS)])
def test_matches_megatron_step_by_step(kwargs: Dict[str, Any], steps: int) -> None:
    ours = LRSchedule(**kwargs)
    ours_opt, ref_opt = _optimizer(2, wd_mult=0.5), _optimizer(2, wd_mult=0.5)
    ref = _megatron(ours, ref_opt)  # sets step-0 values, like our apply()
    ours.apply(ours_opt)
    for step in range(steps + 1):
        if step:
            ours.step(ours_opt)
            ref.step(1)
        for mine, theirs in zip(ours_opt.param_groups, ref_opt.param_groups):
            assert mine["lr"] == theirs["lr"], f"step {step}: lr {mine['lr']} != Megatron {theirs['lr']}"
            assert mine["weight_decay"] == theirs["weight_decay"], f"step {step}: weight decay differs"
        assert ours.lr_at(step) == ref_opt.param_groups[0]["lr"]


def test_hand_computed_values() -> None:
    cos = LRSchedule(1e-3, min_lr=1e-4, lr_warmup_iters=10, train_iters=110, lr_decay_style="cosine")
    assert cos.lr_at(0) == 0.0
    assert cos.lr_at(5) == pytest.approx(5e-4)
    assert cos.lr_at(10) == pytest.approx(1e-3)
    assert cos.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the decay
    assert cos.lr_at(110) == pytest.approx(1e-4)
    assert cos.lr_at(10_000) == 1e-4
    lin = LRSchedule(1.0, min_lr=0.0, train_iters=4, lr_decay_style="linear")
    assert [lin.lr_at(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    const = LRSchedule(2e-4, min_lr=1e-5, lr_warmup_iters=2, train_iters=4, lr_decay_style="constant")
    assert [const.lr_at(s) for s in (0, 1, 2, 3, 100)] == [0.0, 1e-4, 2e-4, 2e-4, 2e-4]
    isr = LRSchedule(1.0, lr_warmup_iters=4, train_iters=100, lr_decay_style="inverse-square-root")
    assert isr.lr_at(16) == pytest.approx(0.5) and isr.lr_at(64) == pytest.approx(0.25)
    assert isr.lr_at(101) == 0.0  # past --lr-decay-iters: min_lr
    # WSD: 2 warmup, stable until 10 - 4 = 6, then a 4-step anneal.
    for style, mid in [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5 ** 0.5 - 1),
                       ("minus_sqrt", 1 - 0.5 ** 0.5)]:
        wsd = LRSchedule(1.0, min_lr=0.0, lr_warmup_iters=2, train_iters=10, lr_decay_style="WSD",
                         lr_wsd_decay_iters=4, lr_wsd_decay_style=style)
        assert [wsd.lr_at(s) for s in (1, 2, 3, 6)] == [0.5, 1.0, 1.0, 1.0]
        assert wsd.lr_at(8) == pytest.approx(mid), style
        assert wsd.lr_at(10) == pytest.approx(0.0, abs=1e-15) and wsd.lr_at(11) == 0.0


def test_warmup_fraction_and_wsd_fraction() -> None:
    sched = LRSchedule(1.0, lr_warmup_fraction=0.25, train_iters=40, lr_decay_style="WSD",
                       lr_wsd_decay_fraction=0.5)
    assert sched.warmup_steps == 10 and sched.wsd_decay_steps == 20
    assert sched.lr_at(5) == 0.5 and sched.lr_at(20) == 1.0 and sched.lr_at(30) < 1.0


def test_lr_mult_and_wd_mult_per_group() -> None:
    sched = LRSchedule(1e-3, train_iters=10, lr_decay_style="constant", weight_decay=0.1)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_mult": 0.1, "wd_mult": 0.0}])
    assert sched.apply(opt) == 1e-3
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-4) and opt.param_groups[1]["weight_decay"] == 0.0


def test_resume_from_state_dict_gives_identical_lrs() -> None:
    kwargs = dict(lr=3e-4, min_lr=3e-5, lr_warmup_fraction=0.1, train_iters=57, lr_decay_style="WSD",
                  lr_wsd_decay_iters=19, lr_wsd_decay_style="minus_sqrt", start_weight_decay=0.0,
                  end_weight_decay=0.1, weight_decay_incr_style="linear")
    full, full_opt = LRSchedule(**kwargs), _optimizer()
    full.apply(full_opt)
    first = LRSchedule(**kwargs)
    trajectory = []
    for step in range(1, 61):
        full.step(full_opt)
        trajectory.append((full_opt.param_groups[0]["lr"], full_opt.param_groups[0]["weight_decay"]))
        if step <= 23:
            first.step()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed, resumed_opt = LRSchedule(**kwargs), _optimizer()
    resumed.load_state_dict(state)
    assert resumed.num_steps == 23
    resumed.apply(resumed_opt)
    assert resumed_opt.param_groups[0]["lr"] == trajectory[22][0]
    for step in range(24, 61):
        resumed.step(resumed_opt)
        assert (resumed_opt.param_groups[0]["lr"], resumed_opt.param_groups[0]["weight_decay"]) == \
            trajectory[step - 1], f"step {step}"


def test_load_policies() -> None:
    old = LRSchedule(1e-3, train_iters=100, lr_decay_style="cosine")
    old.step(increment=40)
    state = old.state_dict()
    new = LRSchedule(2e-3, train_iters=100, lr_decay_style="cosine")
    with pytest.raises(ConfigError, match=r"--lr is 0\.002 but the checkpoint was trained with 0\.001"):
        new.load_state_dict(state)
    assert new.num_steps == 0
    new.load_state_dict(state, policy="override")
    assert new.num_steps == 40 and new.lr == 2e-3
    adopt = LRSchedule(2e-3, train_iters=10, lr_decay_style="linear")
    adopt.load_state_dict(state, policy="use-checkpoint")
    assert adopt.lr == 1e-3 and adopt.decay_style == "cosine" and adopt.lr_at(40) == old.lr_at(40)


def test_damaged_state_is_reported() -> None:
    sched = LRSchedule(1e-3, train_iters=10)
    state = sched.state_dict()
    del state["num_steps"]
    with pytest.raises(DataFormatError, match="lacks num_steps"):
        sched.load_state_dict(state)
    with pytest.raises(DataFormatError, match="format"):
        sched.load_state_dict({**sched.state_dict(), "format": 99})


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=1e-4, min_lr=1e-3, train_iters=10), r"--min-lr 0\.001 must be >= 0 and must not exceed --lr 0\.0001"),
    (dict(lr=1e-4), "--lr-decay-iters or --train-iters"),
    (dict(lr=1e-4, train_iters=10, lr_warmup_iters=10), "--lr-warmup-iters 10 must be >= 0 and smaller than"),
    (dict(lr=1e-4, train_iters=10, lr_warmup_iters=2, lr_warmup_fraction=0.1), "only one of --lr-warmup-fraction"),
    (dict(lr=1e-4, train_iters=10, lr_warmup_fraction=1.5), r"--lr-warmup-fraction 1\.5"),
    (dict(lr=1e-4, train_iters=10, lr_decay_style="step"), "--lr-decay-style 'step' is not one of"),
    (dict(lr=1e-4, train_iters=10, lr_decay_style="WSD"), "needs --lr-wsd-decay-iters"),
    (dict(lr=1e-4, train_iters=10, lr_warmup_iters=4, lr_decay_style="WSD", lr_wsd_decay_iters=7),
     "--lr-wsd-decay-iters 7 must be > 0 and at most"),
    (dict(lr=1e-4, train_iters=10, lr_decay_style="WSD", lr_wsd_decay_iters=2, lr_wsd_decay_style="square"),
     "--lr-wsd-decay-style 'square'"),
    (dict(lr=1e-4, train_iters=10, lr_warmup_init=1e-3), "--lr-warmup-init"),
    (dict(lr=1e-4, train_iters=10, start_weight_decay=0.1), "both --start-weight-decay and --end-weight-decay"),
    (dict(lr=1e-4, train_iters=10, start_weight_decay=0.0, end_weight_decay=0.1),
     "--weight-decay-incr-style constant needs"),
    (dict(lr=1e-4, train_iters=10, start_weight_decay=0.2, end_weight_decay=0.1, weight_decay_incr_style="linear"),
     "--start-weight-decay 0.2 must be >= 0 and must not exceed"),
    (dict(lr=float("nan"), train_iters=10), "--lr nan"),
])
def test_validation_names_the_flag(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LRSchedule(**kwargs)


def test_from_config_uses_megatron_flag_names() -> None:
    from megalign.config.sections import OptimizationSection

    section = OptimizationSection(lr=1e-3, min_lr=1e-5, lr_warmup_iters=0, lr_warmup_fraction=0.1, lr_decay_iters=None,
                                  train_iters=200, lr_decay_style="cosine", lr_wsd_decay_iters=None,
                                  lr_wsd_decay_style="exponential", weight_decay=0.1, micro_batch_size=4)
    sched = LRSchedule.from_config(section, train_iters=200)
    assert sched.warmup_steps == 20 and sched.decay_steps == 200 and sched.wd_at(5) == 0.1
    assert math.isclose(sched.lr_at(20), 1e-3)


def test_strict_resume_ignores_run_length_unless_weight_decay_ramps() -> None:
    from megalign.errors import ConfigError
    from megalign.training.lr_schedule import LRSchedule

    def schedule(train_iters: int, style: str) -> LRSchedule:
        return LRSchedule(1e-3, min_lr=1e-4, lr_warmup_iters=2, lr_decay_iters=20, train_iters=train_iters,
                          lr_decay_style="cosine", start_weight_decay=0.0,
                          end_weight_decay=0.0 if style == "constant" else 0.1, weight_decay_incr_style=style)

    saved = schedule(10, "constant").state_dict()
    schedule(20, "constant").load_state_dict(saved)  # stopping early and resuming longer is fine
    with pytest.raises(ConfigError, match="--train-iters"):
        schedule(20, "linear").load_state_dict(schedule(10, "linear").state_dict())


# ---- sample-based schedules (--train-samples) and --decoupled-lr, against megatron-core -----------------------

def _megatron_from_flags(optimizer: torch.optim.Optimizer, flags: Dict[str, Any], gbs: int) -> Any:
    """megatron-core's scheduler built the way Megatron's get_optimizer_param_scheduler derives it from flags."""
    sched_mod = pytest.importorskip("megatron.core.optimizer_param_scheduler")
    style = "WSD" if flags.get("lr_decay_style", "linear").lower() == "wsd" else flags.get("lr_decay_style", "linear")
    if flags.get("train_samples") is not None:
        decay = flags.get("lr_decay_samples") or flags["train_samples"]
        wd_incr, wsd = flags["train_samples"], flags.get("lr_wsd_decay_samples")
        warmup = (flags["lr_warmup_fraction"] * decay if flags.get("lr_warmup_fraction") is not None
                  else flags.get("lr_warmup_samples", 0))
    else:
        decay = (flags.get("lr_decay_iters") or flags["train_iters"]) * gbs
        wd_incr = flags["train_iters"] * gbs
        wsd = flags["lr_wsd_decay_iters"] * gbs if flags.get("lr_wsd_decay_iters") is not None else None
        warmup = (flags["lr_warmup_fraction"] * decay if flags.get("lr_warmup_fraction") is not None
                  else flags.get("lr_warmup_iters", 0) * gbs)
    wd = flags.get("weight_decay", 0.0)
    return sched_mod.OptimizerParamScheduler(
        optimizer, init_lr=flags.get("lr_warmup_init", 0.0), max_lr=flags["lr"], min_lr=flags.get("min_lr", 0.0),
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=style,
        start_wd=flags.get("start_weight_decay", wd), end_wd=flags.get("end_weight_decay", wd),
        wd_incr_steps=wd_incr, wd_incr_style=flags.get("weight_decay_incr_style", "constant"),
        wsd_decay_steps=wsd, lr_wsd_decay_style=flags.get("lr_wsd_decay_style", "exponential"))


SAMPLE_SETTINGS = [
    (dict(lr=1e-3, min_lr=1e-5, train_samples=400, lr_decay_style="linear", lr_warmup_samples=50), 8, 55),
    (dict(lr=6e-4, min_lr=6e-5, train_samples=1000, lr_decay_samples=900, lr_decay_style="cosine",
          lr_warmup_samples=96, lr_warmup_init=1e-5), 16, 70),
    (dict(lr=6e-4, min_lr=0.0, train_samples=777, lr_decay_style="cosine", lr_warmup_fraction=0.07), 12, 70),
    (dict(lr=2e-4, min_lr=2e-5, train_samples=640, lr_decay_style="WSD", lr_warmup_samples=40,
          lr_wsd_decay_samples=200, lr_wsd_decay_style="cosine"), 8, 85),
    (dict(lr=2e-4, min_lr=1e-6, train_samples=500, lr_decay_style="wsd", lr_warmup_fraction=0.1,
          lr_wsd_decay_samples=130, lr_wsd_decay_style="minus_sqrt"), 10, 55),
    (dict(lr=1e-3, min_lr=1e-4, train_samples=300, lr_decay_style="inverse-square-root", lr_warmup_samples=30),
     6, 55),
    (dict(lr=1e-3, min_lr=1e-5, train_samples=320, lr_decay_style="cosine", lr_warmup_samples=16,
          start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="linear"), 8, 45),
    # iteration-based, with Megatron's own iters -> samples conversion
    (dict(lr=1e-3, min_lr=1e-5, train_iters=40, lr_decay_style="cosine", lr_warmup_fraction=0.13), 8, 45),
]


@pytest.mark.megatron
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("flags,gbs,steps", SAMPLE_SETTINGS,
                         ids=[f"{kw['lr_decay_style']}-{i}" for i, (kw, _, _) in enumerate(SAMPLE_SETTINGS)])
def test_sample_based_schedule_matches_megatron(flags: Dict[str, Any], gbs: int, steps: int) -> None:
    ours = LRSchedule(global_batch_size=gbs, **flags)
    assert ours.step_unit == ("samples" if "train_samples" in flags else "iterations")
    ours_opt, ref_opt = _optimizer(2, wd_mult=0.5), _optimizer(2, wd_mult=0.5)
    ref = _megatron_from_flags(ref_opt, flags, gbs)
    ours.apply(ours_opt)
    for step in range(steps + 1):
        if step:
            ours.step(ours_opt)  # one optimizer update: the global batch size in samples
            ref.step(gbs)  # Megatron's training loop: increment = global batch size
        for mine, theirs in zip(ours_opt.param_groups, ref_opt.param_groups):
            assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12, abs=1e-18), f"update {step}: lr"
            assert mine["weight_decay"] == pytest.approx(theirs["weight_decay"], rel=1e-12), f"update {step}: wd"


@pytest.mark.megatron
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("decoupled_min_lr", [None, 3e-6])
def test_decoupled_lr_groups_match_megatron(decoupled_min_lr: Any) -> None:
    from megalign.training.optimizer import param_groups_for

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(5, 4)
            self.proj = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 5, bias=False)

    flags = dict(lr=1e-3, min_lr=1e-5, train_samples=480, lr_decay_style="cosine", lr_warmup_samples=48,
                 weight_decay=0.1)
    groups = param_groups_for(Tiny(), 0.1, decoupled_lr=5e-3, decoupled_min_lr=decoupled_min_lr)
    names = [sorted(group["names"]) for group in groups]
    assert names == [["proj.weight"], ["proj.bias"], ["embed_tokens.weight", "lm_head.weight"]]
    assert "max_lr" not in groups[0] and groups[2]["max_lr"] == 5e-3
    assert groups[2].get("min_lr") == decoupled_min_lr
    ours_opt = torch.optim.AdamW(groups, lr=1e-3)
    ref_opt = torch.optim.AdamW([{k: (list(v) if k == "params" else v) for k, v in g.items() if k != "names"}
                                 for g in param_groups_for(Tiny(), 0.1, 5e-3, decoupled_min_lr)], lr=1e-3)
    ours = LRSchedule(global_batch_size=8, **flags)
    ref = _megatron_from_flags(ref_opt, flags, 8)
    ours.apply(ours_opt)
    for step in range(70):
        if step:
            ours.step(ours_opt)
            ref.step(8)
        for mine, theirs in zip(ours_opt.param_groups, ref_opt.param_groups):
            assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12, abs=1e-18), f"update {step}"
    floor = decoupled_min_lr if decoupled_min_lr is not None else 1e-5
    assert ours_opt.param_groups[2]["lr"] == floor and ours_opt.param_groups[0]["lr"] == 1e-5  # past the decay


def test_sample_based_state_resumes_and_refuses_another_unit() -> None:
    kwargs = dict(lr=1e-3, min_lr=1e-5, train_samples=400, lr_decay_style="cosine", lr_warmup_samples=40)
    first = LRSchedule(global_batch_size=8, **kwargs)
    for _ in range(7):
        first.step()
    assert first.num_steps == 56 and first.increment == 8
    state = json.loads(json.dumps(first.state_dict()))
    resumed = LRSchedule(global_batch_size=8, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.current_lr == first.current_lr
    iteration_based = LRSchedule(1e-3, min_lr=1e-5, train_iters=400, lr_decay_style="cosine", lr_warmup_iters=40)
    with pytest.raises(ConfigError, match="step unit"):
        iteration_based.load_state_dict(state)
    old = iteration_based.state_dict()
    del old["step_unit"]  # a checkpoint from before sample-based schedules
    LRSchedule(1e-3, min_lr=1e-5, train_iters=400, lr_decay_style="cosine", lr_warmup_iters=40).load_state_dict(old)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=1e-4, train_iters=10, lr_decay_samples=100),
     "--lr-decay-samples 100 cannot be used with --train-iters .*give --lr-decay-iters"),
    (dict(lr=1e-4, train_iters=10, lr_warmup_samples=5), "--lr-warmup-samples 5 cannot be used with --train-iters"),
    (dict(lr=1e-4, train_samples=100, lr_decay_iters=10),
     "--lr-decay-iters 10 cannot be used with --train-samples .*give --lr-decay-samples"),
    (dict(lr=1e-4, train_samples=100, lr_warmup_iters=3), "--lr-warmup-iters 3 cannot be used with --train-samples"),
    (dict(lr=1e-4, train_samples=100, lr_decay_style="WSD", lr_wsd_decay_iters=3),
     "--lr-wsd-decay-iters 3 cannot be used with --train-samples"),
    (dict(lr=1e-4, train_iters=10, train_samples=100), "--train-iters and --train-samples"),
    (dict(lr=1e-4, train_samples=100, lr_warmup_samples=10, lr_warmup_fraction=0.1),
     "only one of --lr-warmup-fraction 0.1 and --lr-warmup-samples 10"),
    (dict(lr=1e-4, train_samples=100, lr_warmup_samples=100), "--lr-warmup-samples 100 must be >= 0 and smaller"),
    (dict(lr=1e-4, train_samples=100, lr_decay_style="WSD"), "needs --lr-wsd-decay-samples"),
    (dict(lr=1e-4, train_samples=100, lr_warmup_samples=50, lr_decay_style="WSD", lr_wsd_decay_samples=60),
     "--lr-wsd-decay-samples 60 must be > 0 and at most --lr-decay-samples minus --lr-warmup-samples"),
])
def test_sample_flags_are_validated_by_name(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LRSchedule(**kwargs)
