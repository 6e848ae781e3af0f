"""The single-process trainer: learning, exact resume, the `megalign train` command and unsupported flags."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from megalign.cli import main as cli_main
from megalign.config import load_config
from megalign.checkpoint.storage import load_checkpoint
from megalign.training.trainer import Trainer, train


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--data-cache-path", str(cache), "--split", "90,10,0", "--seed", "7", *extra]


def test_tiny_preset_learns_the_sample(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    config = load_config(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "300",
                               "--lr", "5e-3", "--lr-warmup-iters", "20", "--lr-decay-style", "cosine",
                               "--log-interval", "100", "--eval-interval", "150", "--eval-iters", "4",
                               "--log-throughput"))
    log = io.StringIO()
    trainer = Trainer(config, stream=log)
    try:
        before = trainer.evaluate()
        result = trainer.train()
    finally:
        trainer.close()
    losses = [result.losses[step] for step in range(1, 301)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.5, losses
    assert sorted(result.evaluations) == [150, 300]
    # validation loss (unseen documents) falls well below where it started: ln(1024) = 6.93 at random init
    assert result.evaluations[300] < result.evaluations[150] < before - 1.0, (before, result.evaluations)
    assert result.evaluations[300] < before - 1.5, (before, result.evaluations)
    text = log.getvalue()
    for piece in ("step 100/300 | loss", "| lr ", "| grad norm ", "| loss scale 1 |", "| skipped 0 |", "tokens/s",
                  "samples/s", "TFLOP/s", "MFU n/a", "| mem ", "ETA", "validation at step 300 | loss", "perplexity"):
        assert piece in text, text


def test_exact_resume_matches_straight_run(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "8", "--lr", "1e-3",
                   "--lr-warmup-iters", "2", "--log-interval", "4", "--eval-interval", "4", "--eval-iters", "1")
    straight = train(load_config(common + ["--save", str(tmp_path / "a")]), stream=io.StringIO())
    first = train(load_config(common + ["--save", str(tmp_path / "b")]), stream=io.StringIO(), stop_after=4)
    assert first.iteration == 4 and first.consumed_samples == 16
    torch.manual_seed(999)  # resume must restore the RNG, not depend on the process state
    # the resumed half reads its batches through 2 DataLoader workers: the stream must not depend on them
    resumed = train(load_config(common + ["--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"),
                                          "--num-workers", "2"]), stream=io.StringIO())
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert [first.losses[s] for s in range(1, 5)] + [resumed.losses[s] for s in range(5, 9)] == \
        [straight.losses[s] for s in range(1, 9)]
    assert resumed.evaluations[8] == straight.evaluations[8]
    with load_checkpoint(tmp_path / "a") as a, load_checkpoint(tmp_path / "b") as b:
        assert a.step == b.step == 8 and a.consumed_samples == b.consumed_samples == 32
        wa, wb = a.model_state(), b.model_state()
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        oa, ob = a.optimizer_state(), b.optimizer_state()
        assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
        assert a.extra["lr_schedule"] == b.extra["lr_schedule"]


def test_finetune_loads_weights_only(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2", "--lr", "1e-3",
                   "--eval-iters", "0")
    train(load_config(common + ["--save", str(tmp_path / "a")]), stream=io.StringIO())
    trainer = Trainer(load_config(common + ["--load", str(tmp_path / "a"), "--finetune"]), stream=io.StringIO())
    try:
        assert trainer.iteration == 0 and trainer.consumed_samples == 0 and trainer.schedule.num_steps == 0
        with load_checkpoint(tmp_path / "a") as saved:
            state = saved.model_state()
        assert all(torch.equal(state[k], v) for k, v in trainer.model.model_state().items())
    finally:
        trainer.close()


def test_bf16_keeps_fp32_masters(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    config = load_config(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2",
                               "--lr", "1e-3", "--eval-iters", "0", "--bf16"))
    trainer = Trainer(config, stream=io.StringIO())
    try:
        result = trainer.train()
        assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
        assert all(pair.master_param.dtype == torch.float32 for pair in trainer.optimizer.pairs)
        assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    finally:
        trainer.close()


def test_train_help_and_bad_combination(capsys: pytest.CaptureFixture, repo_root: Path, data_prefix: str,
                                        sentencepiece_model: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--micro-batch-size" in capsys.readouterr().out
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2", "--lr", "1e-3")
    assert cli_main(["train", *argv, "--bf16", "--fp16"]) == 2
    assert "--bf16 and --fp16 cannot be used together" in capsys.readouterr().err
    script = subprocess.run([sys.executable, str(repo_root / "pretrain_gpt.py"), "--seq-length", "32"],
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 2 and "is required" in script.stderr, script.stderr


def test_missing_data_path_errors(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["train", "--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                     "--train-iters", "2", "--lr", "1e-3"]) == 2
    assert "--data-path is required" in capsys.readouterr().err


def test_collate_stacks_blended_samples_with_scalar_dataset_id() -> None:
    from megalign.training.batches import collate

    samples = [{"dataset_id": i % 2, "tokens": torch.arange(4) + i} for i in range(3)]
    batch = collate(samples)
    assert batch["dataset_id"].tolist() == [0, 1, 0]
    assert batch["tokens"].shape == (3, 4) and batch["tokens"][2].tolist() == [2, 3, 4, 5]
