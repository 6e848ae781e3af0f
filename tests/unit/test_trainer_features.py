"""Trainer features beyond the core loop: TensorBoard, MFU/memory logging, recomputation, async saves, NaN abort,
vocabulary checks and start-time refusals."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import List

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from megalign.cli import main as cli_main
from megalign.config import load_config
from megalign.errors import DataFormatError
from megalign.checkpoint.storage import list_checkpoints, load_checkpoint
from megalign.training.loss_scale import TooManyNonFiniteSteps
from megalign.training.trainer import Trainer, train


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--data-cache-path", str(cache), "--split", "90,10,0", "--seed", "7", "--lr", "1e-3", *extra]


def test_tensorboard_scalars_and_mfu(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    log = io.StringIO()
    result = train(load_config(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "4",
                                     "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2",
                                     "--tensorboard-dir", str(tmp_path / "tb"), "--peak-tflops", "0.5",
                                     "--log-throughput")), stream=log)
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = event_accumulator.EventAccumulator(str(files[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()  # TensorBoard's own reader
    by_tag = {tag: {event.step: event.value for event in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert by_tag["lm loss"] == pytest.approx({s: result.losses[s] for s in range(1, 5)}, rel=1e-6)
    assert sorted(by_tag["lm loss validation"]) == [2, 4]
    for step in (2, 4):
        assert by_tag["lm loss validation"][step] == pytest.approx(result.evaluations[step], rel=1e-6)
        assert by_tag["lm loss validation ppl"][step] == pytest.approx(math.exp(result.evaluations[step]), rel=1e-5)
    for tag in ("learning-rate", "grad-norm", "loss-scale", "skipped-steps", "tokens-per-second", "tflops", "mfu",
                "mem-peak-gib"):
        assert sorted(by_tag[tag]) == [1, 2, 3, 4], tag
    assert all(0 < value < 1 for value in by_tag["mfu"].values())
    assert by_tag["mfu"][4] == pytest.approx(by_tag["tflops"][4] / 0.5, rel=1e-5)
    assert "| MFU " in log.getvalue() and "MFU n/a" not in log.getvalue()


@pytest.mark.parametrize("flags", [
    ["--recompute-granularity", "selective"],
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
])
def test_recomputation_does_not_change_losses(data_prefix: str, sentencepiece_model: Path, tmp_path: Path,
                                              flags: List[str]) -> None:
    common = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "3", "--eval-iters", "0",
                   "--reset-attention-mask")
    plain = train(load_config(common), stream=io.StringIO())
    log = io.StringIO()
    recomputed = train(load_config(common + flags), stream=log)
    assert recomputed.losses == plain.losses
    assert f"recompute {flags[1]}" in log.getvalue()


def test_async_save_writes_the_same_checkpoints(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "4", "--eval-iters", "0",
                   "--save-interval", "2", "--lr-decay-iters", "5")
    train(load_config(common + ["--save", str(tmp_path / "sync")]), stream=io.StringIO())
    log = io.StringIO()
    train(load_config(common + ["--save", str(tmp_path / "async"), "--async-save"]), stream=log)
    assert "in the background" in log.getvalue()
    assert list_checkpoints(tmp_path / "sync") == list_checkpoints(tmp_path / "async") == [2, 4]
    for step in (2, 4):
        with load_checkpoint(tmp_path / "sync", step) as a, load_checkpoint(tmp_path / "async", step) as b:
            for state_a, state_b in ((a.model_state(), b.model_state()), (a.optimizer_state(), b.optimizer_state())):
                assert state_a.keys() == state_b.keys()
                assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
            assert a.extra == b.extra and a.consumed_samples == b.consumed_samples
    # the asynchronous checkpoint resumes like any other
    resumed = train(load_config(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "5",
                                      "--eval-iters", "0", "--lr-decay-iters", "5", "--load", str(tmp_path / "async"))),
                    stream=io.StringIO())
    assert sorted(resumed.losses) == [5]


def test_nan_steps_are_skipped_then_abort_with_checkpoint(data_prefix: str, sentencepiece_model: Path,
                                                          tmp_path: Path) -> None:
    config = load_config(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "10",
                               "--eval-iters", "0", "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                               "--max-consecutive-skipped-steps", "3", "--log-interval", "1"))
    log = io.StringIO()
    trainer = Trainer(config, stream=log)
    model = trainer.model.chunks[0]
    forward, calls = model.forward, []

    def poisoned(*args, **kwargs):  # from step 3 on (2 micro-batches per step) every loss is NaN
        calls.append(1)
        loss = forward(*args, **kwargs)
        return loss * float("nan") if len(calls) > 4 else loss

    model.forward = poisoned
    try:
        with pytest.raises(TooManyNonFiniteSteps, match="3"):
            trainer.train()
    finally:
        trainer.close()
    assert trainer.iteration == 5  # steps 3, 4, 5 skipped; the third in a row aborts
    assert list_checkpoints(tmp_path / "ckpt") == [2, 4, 5]
    with load_checkpoint(tmp_path / "ckpt", 2) as good, load_checkpoint(tmp_path / "ckpt", 5) as last:
        assert last.step == 5 and last.extra["skipped_steps"]
        a, b = good.model_state(), last.model_state()
        assert all(torch.equal(a[k], b[k]) for k in a)  # skipped steps leave the weights untouched
    assert "skipped 1" in log.getvalue()


def test_data_outside_the_vocabulary_is_refused(data_prefix: str, tmp_path: Path) -> None:
    argv = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--data-path", data_prefix,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--data-cache-path", str(tmp_path / "c"),
            "--split", "90,10,0", "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "0"]
    # 101 = 100 tokens + eod; the rows padded up to 128 are padding, which no data may hold
    with pytest.raises(DataFormatError, match=r"token id \d+ is outside the model's vocabulary of 101"):
        train(load_config(argv), stream=io.StringIO())


def test_unavailable_attention_backend_fails_at_start(capsys: pytest.CaptureFixture, data_prefix: str,
                                                      sentencepiece_model: Path, tmp_path: Path) -> None:
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2",
                 "--attention-backend", "flash")
    assert cli_main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "--attention-backend flash: cannot be used" in err and "--attention-backend auto" in err, err


def test_torch_compile_matches_eager(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2", "--eval-iters", "0")
    eager = train(load_config(common), stream=io.StringIO())
    log = io.StringIO()
    compiled = train(load_config(common + ["--torch-compile"]), stream=log)
    assert "torch.compile" in log.getvalue()
    # inductor fuses element-wise work, so the last bits may differ from eager
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


def test_multi_process_flags_without_torchrun_fail_clearly(monkeypatch: pytest.MonkeyPatch, data_prefix: str,
                                                            sentencepiece_model: Path, tmp_path: Path) -> None:
    from megalign.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT is not set: launch with "
                                          "torchrun"):
        Trainer(load_config(argv), stream=io.StringIO())
    with pytest.raises(ConfigError, match="--async-save is for single-process runs"):
        Trainer(load_config(argv + ["--save", str(tmp_path / "s"), "--async-save"]), stream=io.StringIO())
