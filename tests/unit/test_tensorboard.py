"""StepLogger's TensorBoard output (torch's SummaryWriter), read back with TensorBoard's own EventAccumulator:
Megatron's tag names, steps, values, --tensorboard-log-interval, validation scalars, flushing, and the
ConfigError raised when the tensorboard package cannot be imported."""
from __future__ import annotations

import io
import math
import re
import struct
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from megalign.errors import ConfigError
from megalign.training.step_log import TENSORBOARD_MISSING, StepLogger
from megalign.training.throughput import ThroughputMeter

Scalars = Dict[str, Dict[int, float]]

TRAIN_TAGS = {"lm loss", "learning-rate", "grad-norm", "loss-scale", "skipped-steps", "tokens-per-second",
              "samples-per-second", "tflops", "mfu", "mem-allocated-gib", "mem-peak-gib"}
VALIDATION_TAGS = {"lm loss validation", "lm loss validation ppl"}


def f32(value: float) -> float:
    """Round through float32, the precision of a scalar event's simple_value."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def read_events(log_dir: Path) -> Scalars:
    """tag -> {step: value} from the single event file in ``log_dir``, via TensorBoard's EventAccumulator."""
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    assert [p for p in log_dir.iterdir() if p.is_dir()] == []  # no per-tag sub-runs (add_scalars would make them)
    acc = event_accumulator.EventAccumulator(str(files[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: {event.step: event.value for event in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def make_logger(log_dir: Optional[Path], peak: Optional[float] = 1e-6, interval: int = 1,
                total_steps: int = 4) -> StepLogger:
    meter = ThroughputMeter(flops_per_token=1000, peak=peak)
    return StepLogger(io.StringIO(), torch.device("cpu"), meter, tokens_per_step=64, samples_per_step=2,
                      total_steps=total_steps, log_interval=2, tensorboard_dir=str(log_dir) if log_dir else None,
                      tensorboard_interval=interval)


def test_step_logger_writes_megatron_tags(tmp_path: Path) -> None:
    log_dir = tmp_path / "runs" / "tb"  # created, parents included
    logger = make_logger(log_dir)
    logger.step(1, 2.5, 3e-4, 1.5, skipped=False, loss_scale=65536.0)
    logger.step(2, math.nan, 2e-4, None, skipped=True, loss_scale=32768.0)  # skipped: no loss, no grad norm
    logger.validation(2, 1.25)
    on_disk_before_close = read_events(log_dir)  # validation flushes
    logger.step(3, 0.1, 1e-4, None, skipped=False, loss_scale=32768.0)  # no grad norm (e.g. not computed)
    logger.step(4, -1.0, 5e-5, 0.25, skipped=False, loss_scale=32768.0)
    logger.validation(4, 800.0)
    logger.close()
    logger.close()  # idempotent

    assert on_disk_before_close["lm loss validation"] == {2: 1.25}
    assert on_disk_before_close["lm loss"] == {1: 2.5}
    scalars = read_events(log_dir)
    assert set(scalars) == TRAIN_TAGS | VALIDATION_TAGS
    assert scalars["lm loss"] == {1: 2.5, 3: f32(0.1), 4: -1.0}
    assert scalars["grad-norm"] == {1: 1.5, 4: 0.25}
    assert scalars["learning-rate"] == {1: f32(3e-4), 2: f32(2e-4), 3: f32(1e-4), 4: f32(5e-5)}
    assert scalars["loss-scale"] == {1: 65536.0, 2: 32768.0, 3: 32768.0, 4: 32768.0}
    assert scalars["skipped-steps"] == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    for tag in TRAIN_TAGS - {"lm loss", "grad-norm"}:
        assert sorted(scalars[tag]) == [1, 2, 3, 4], tag
    for step in range(1, 5):
        assert scalars["tokens-per-second"][step] > 0
        assert scalars["samples-per-second"][step] == pytest.approx(scalars["tokens-per-second"][step] / 32, rel=1e-5)
        assert scalars["mfu"][step] == pytest.approx(scalars["tflops"][step] / 1e-6, rel=1e-5)
        assert scalars["mem-peak-gib"][step] > 0
    assert scalars["lm loss validation"] == {2: 1.25, 4: 800.0}
    assert scalars["lm loss validation ppl"] == {2: f32(math.exp(1.25)), 4: math.inf}


def test_tensorboard_log_interval_and_no_peak(tmp_path: Path) -> None:
    logger = make_logger(tmp_path, peak=None, interval=2, total_steps=5)
    for step in range(1, 6):
        logger.step(step, 1.0 / step, 1e-3, 1.0, skipped=False, loss_scale=1.0)
    logger.close()
    scalars = read_events(tmp_path)
    assert set(scalars) == TRAIN_TAGS - {"mfu"}
    assert all(sorted(steps) == [2, 4] for steps in scalars.values())
    assert scalars["lm loss"] == {2: 0.5, 4: 0.25}


def test_resumed_logger_writes_a_new_file(tmp_path: Path) -> None:
    first = make_logger(tmp_path)
    first.step(1, 1.0, 1e-3, 1.0, skipped=False, loss_scale=1.0)
    first.close()
    second = make_logger(tmp_path)
    second.step(2, 2.0, 1e-3, 1.0, skipped=False, loss_scale=1.0)
    second.close()
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()  # TensorBoard merges the files of one run directory
    assert [(e.step, e.value) for e in acc.Scalars("lm loss")] == [(1, 1.0), (2, 2.0)]


@pytest.mark.parametrize("missing", ["tensorboard", "torch.utils.tensorboard"])
def test_missing_tensorboard_package_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       missing: str) -> None:
    for name in list(sys.modules):
        if name == "torch.utils.tensorboard" or name.startswith("torch.utils.tensorboard."):
            monkeypatch.delitem(sys.modules, name)  # forces a fresh import; restored after the test
    monkeypatch.setitem(sys.modules, missing, None)  # None in sys.modules: importing it raises ImportError
    with pytest.raises(ConfigError, match=re.escape(TENSORBOARD_MISSING)):
        make_logger(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    logger = make_logger(None)  # without --tensorboard-dir nothing imports it
    logger.step(1, 1.0, 1e-3, 1.0, skipped=False, loss_scale=1.0)
    logger.close()
    assert TENSORBOARD_MISSING == "--tensorboard-dir needs the tensorboard package (pip install tensorboard)"


def test_tensorboard_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        make_logger(tmp_path / "f")
