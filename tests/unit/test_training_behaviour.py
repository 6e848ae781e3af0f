"""Megatron training-behaviour flags: sample-based schedules in the trainer, --exit-duration-in-mins, --profile,
--log-throughput, --calculate-per-token-loss, --decoupled-lr, --grad-reduce-in-bf16, --manual-gc,
--empty-unused-memory-level, --distributed-timeout-minutes and the flags refused with a ConfigError."""

from __future__ import annotations

import datetime
import gc
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from megalign.checkpoint.storage import list_checkpoints
from megalign.config import load_config
from megalign.config.training import parse_batch_size_schedule
from megalign.errors import ConfigError
from megalign.training.run_controls import GarbageCollection, empty_cache
from megalign.training.trainer import Trainer, train


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return [
        "--model-preset",
        "tiny",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--data-path",
        prefix,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(model),
        "--data-cache-path",
        str(cache),
        "--split",
        "90,10,0",
        "--seed",
        "7",
        "--lr",
        "1e-3",
        *extra,
    ]


_BASE = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3"]


# ---- configuration: refusals and conflicts name the flags ---------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--train-iters", "10", "--lr-decay-samples", "100"],
            "--lr-decay-samples 100 cannot be used with --train-iters",
        ),
        (
            ["--train-samples", "100", "--lr-warmup-iters", "2"],
            "--lr-warmup-iters 2 cannot be used with --train-samples",
        ),
        (["--train-iters", "10", "--lr-wsd-decay-samples", "5"], "--lr-wsd-decay-samples is only used with"),
        (["--train-iters", "10", "--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
        (
            ["--train-iters", "10", "--decoupled-lr", "1e-3", "--decoupled-min-lr", "1e-2"],
            "must not exceed --decoupled-lr",
        ),
        (["--train-iters", "10", "--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
        (["--train-iters", "10", "--profile-step-start", "3"], "--profile-step-start needs --profile"),
        (
            ["--train-iters", "10", "--profile", "--profile-step-start", "4", "--profile-step-end", "4"],
            "--profile-step-end 4 must be larger than --profile-step-start 4",
        ),
        (["--train-iters", "10", "--profile", "--profile-ranks", "x"], "--profile-ranks 'x' is not a rank"),
        (["--train-iters", "10", "--manual-gc-interval", "5"], "--manual-gc-interval needs --manual-gc"),
        (["--train-iters", "10", "--no-manual-gc-eval"], "--no-manual-gc-eval needs --manual-gc"),
        (
            ["--train-iters", "10", "--empty-unused-memory-level", "3"],
            "--empty-unused-memory-level 3 must be 0, 1 or 2",
        ),
        (
            ["--train-samples", "1000", "--step-batch-size-schedule", "0:2 1K:4"],
            r"--step-batch-size-schedule '0:2 1K:4': batch-size ramps are not built yet",
        ),
        (
            ["--train-samples", "1000", "--global-batch-size", "4", "--step-batch-size-schedule", "0:2"],
            "--step-batch-size-schedule and --global-batch-size cannot be used together",
        ),
        (["--train-samples", "1000", "--step-batch-size-schedule", "0:3"], "batch size 3 must be divisible"),
        (["--train-samples", "1000", "--step-batch-size-schedule", "5:2"], "must start with a 0:BATCH_SIZE entry"),
        (["--train-samples", "1000", "--step-batch-size-schedule", "0:2 x:4"], "'x:4' is not THRESHOLD:BATCH_SIZE"),
        (
            ["--train-iters", "10", "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "1000"],
            "--rampup-batch-size 4 4 1000: batch-size ramps are not built yet",
        ),
        (
            ["--train-iters", "10", "--global-batch-size", "16", "--rampup-batch-size", "4", "5", "1000"],
            "minus start 4 must be a multiple of the increment 5",
        ),
        (["--train-iters", "10", "--rampup-batch-size", "4", "4"], "give three positive integers"),
    ],
)
def test_configuration_errors_name_the_flag(extra: List[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_BASE + extra)


def test_batch_size_schedule_parses_megatron_suffixes() -> None:
    # the 175B script's schedule
    assert parse_batch_size_schedule("0:16 2.4B:320 11.7B:1536") == [
        (0, 16),
        (2_400_000_000, 320),
        (11_700_000_000, 1536),
    ]
    assert parse_batch_size_schedule("0:8 500K:16 1M:32 1T:64")[1:] == [(500_000, 16), (1_000_000, 32), (10**12, 64)]
    with pytest.raises(ConfigError, match="increasing"):
        parse_batch_size_schedule("0:8 2M:16 1M:32")


def test_accepted_flags_reach_their_sections() -> None:
    config = load_config(
        _BASE
        + [
            "--train-samples",
            "400",
            "--lr-warmup-samples",
            "40",
            "--lr-decay-samples",
            "360",
            "--decoupled-lr",
            "2e-3",
            "--calculate-per-token-loss",
            "--log-throughput",
            "--exit-duration-in-mins",
            "230",
            "--manual-gc",
            "--manual-gc-interval",
            "10",
            "--empty-unused-memory-level",
            "2",
            "--grad-reduce-in-bf16",
            "--profile",
            "--use-pytorch-profiler",
            "--profile-ranks",
            "0",
            "1",
        ]
    )
    assert config.train_iters == 200 and config.optimization.lr_warmup_samples == 40
    assert config.logging.profile_ranks == ["0", "1"] and config.misc.manual_gc_interval == 10
    assert config.parallel.grad_reduce_in_bf16 and config.optimization.calculate_per_token_loss


# ---- the trainer --------------------------------------------------------------------------------------------


def test_sample_based_run_follows_the_sample_schedule(
    data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    from megalign.training.lr_schedule import LRSchedule

    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-samples",
        "24",
        "--eval-iters",
        "0",
        "--lr-warmup-samples",
        "6",
        "--lr-decay-style",
        "cosine",
        "--min-lr",
        "1e-5",
    )
    trainer = Trainer(load_config(argv), stream=io.StringIO())
    try:
        assert trainer.schedule.step_unit == "samples" and trainer.schedule.increment == 4
        seen = []
        for _ in range(6):
            seen.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.train(stop_after=trainer.iteration + 1)
    finally:
        trainer.close()
    reference = LRSchedule(1e-3, min_lr=1e-5, train_samples=24, lr_warmup_samples=6, lr_decay_style="cosine")
    assert seen == [reference.lr_at(4 * step) for step in range(6)]
    assert seen[1] == pytest.approx(1e-3 * 4 / 6)  # 4 samples of a 6-sample warmup
    assert trainer.consumed_samples == 24 and trainer.schedule.num_steps == 24


def test_sample_based_run_resumes_exactly(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-samples",
        "24",
        "--eval-iters",
        "0",
        "--lr-warmup-samples",
        "6",
        "--lr-decay-style",
        "cosine",
        "--lr-decay-samples",
        "20",
    )
    straight = train(load_config(common), stream=io.StringIO())
    first = train(load_config(common + ["--save", str(tmp_path / "b")]), stream=io.StringIO(), stop_after=3)
    resumed = train(load_config(common + ["--load", str(tmp_path / "b")]), stream=io.StringIO())
    assert first.consumed_samples == 12 and sorted(resumed.losses) == [4, 5, 6]
    assert {**first.losses, **resumed.losses} == straight.losses


def test_exit_duration_stops_at_a_step_boundary_and_saves(
    data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "20",
        "--eval-iters",
        "0",
        "--exit-duration-in-mins",
        "2",
        "--save",
        str(tmp_path / "ckpt"),
        "--save-interval",
        "4",
    )
    log = io.StringIO()
    trainer = Trainer(load_config(argv), stream=log)
    now = [1000.0]
    trainer.clock = lambda: now[0]
    forward = trainer.model.chunks[0].forward

    def slow_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        now[0] += 25.0  # two micro-batches: 50 simulated seconds per step
        return forward(*args, **kwargs)

    trainer.model.chunks[0].forward = slow_forward
    try:
        result = trainer.train()
    finally:
        trainer.close()
    assert result.out_of_time and result.iteration == 3  # 150 s > 2 min after step 3
    assert list_checkpoints(tmp_path / "ckpt") == [3]
    assert "--exit-duration-in-mins 2: 2.5 minutes of training, exiting at step 3" in log.getvalue()


def test_profile_writes_a_chrome_trace_of_the_window(
    data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "5",
        "--eval-iters",
        "0",
        "--profile",
        "--profile-step-start",
        "2",
        "--profile-step-end",
        "4",
        "--tensorboard-dir",
        str(tmp_path / "tb"),
    )
    log = io.StringIO()
    train(load_config(argv), stream=log)
    trace = tmp_path / "tb" / "torch_profile" / "rank-0.json"
    assert f"profile: wrote {trace}" in log.getvalue()
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted({event["name"] for event in events if event.get("name", "").startswith("megalign step ")})
    assert steps == ["megalign step 3", "megalign step 4"]  # the steps after 2 done, up to 4 done
    assert any("aten::mm" in event.get("name", "") or "addmm" in event.get("name", "") for event in events)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # beside the TensorBoard events
    other = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "3",
        "--eval-iters",
        "0",
        "--profile",
        "--profile-step-start",
        "1",
        "--profile-step-end",
        "2",
        "--profile-ranks",
        "1",
        "--save",
        str(tmp_path / "s"),
    )
    train(load_config(other), stream=io.StringIO())
    assert not (tmp_path / "s" / "torch_profile").exists()  # rank 0 is not in --profile-ranks


def test_log_throughput_controls_the_tflops_fields(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "2",
        "--eval-iters",
        "0",
        "--log-interval",
        "1",
    )
    quiet, loud = io.StringIO(), io.StringIO()
    train(load_config(common), stream=quiet)
    train(load_config(common + ["--log-throughput"]), stream=loud)
    assert "TFLOP/s" not in quiet.getvalue() and "MFU" not in quiet.getvalue() and "tokens/s" in quiet.getvalue()
    assert "TFLOP/s | MFU n/a (--peak-tflops)" in loud.getvalue()


def _hand_losses(trainer: Trainer, micro: List[Dict[str, torch.Tensor]]) -> Tuple[float, float]:
    """(per-token loss, mean of per-micro-batch means) of ``micro``, by hand: logits -> masked cross entropy."""
    from megalign.training import batches

    model = trainer.model.chunks[0]
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for batch in micro:
            inputs = batches.model_inputs(batch, trainer.device)
            labels, mask = inputs.pop("labels"), inputs.pop("loss_mask").flatten().double()
            logits = model(**inputs).double()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            total += float((ce * mask).sum())
            count += int(mask.sum())
            means.append(float((ce * mask).sum() / mask.sum()))
    return total / count, sum(means) / len(means)


@pytest.mark.parametrize("per_token", [True, False])
def test_per_token_loss_equals_the_hand_computation(
    data_prefix: str, sentencepiece_model: Path, tmp_path: Path, per_token: bool
) -> None:
    from megalign.training import batches

    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "2",
        "--eval-iters",
        "0",
        "--global-batch-size",
        "6",
        *(["--calculate-per-token-loss"] if per_token else []),
    )
    trainer = Trainer(load_config(argv), stream=io.StringIO())
    try:
        micro = batches.take(trainer._micro_batches(trainer.train_data, 0), 3, "training")
        for index, batch in enumerate(micro):  # uneven token counts: the two normalisations then differ
            batch["loss_mask"][0, : 3 + 25 * index] = 0
        counts = [int(batch["loss_mask"].sum()) for batch in micro]
        weights = trainer.model.loss_weights(micro, per_token, trainer.device)
        assert weights == pytest.approx([c / sum(counts) for c in counts] if per_token else [1 / 3] * 3)
        by_token, mean_of_means = _hand_losses(trainer, micro)
        loss, _ = trainer.train_step(micro)
    finally:
        trainer.close()
    assert abs(by_token - mean_of_means) > 1e-3  # the test can tell the two apart
    assert loss == pytest.approx(by_token if per_token else mean_of_means, rel=1e-5)


def test_grad_reduce_in_bf16_keeps_bf16_buffers(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    common = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--train-iters", "2", "--eval-iters", "0")
    plain = train(load_config(common), stream=io.StringIO())
    trainer = Trainer(load_config(common + ["--grad-reduce-in-bf16"]), stream=io.StringIO())
    try:
        assert {buffer.data.dtype for buffer in trainer.optimizer.grads.buffers} == {torch.bfloat16}
        assert all(grad.dtype == torch.float32 for grad in trainer.optimizer.main_grads())
        result = trainer.train()
    finally:
        trainer.close()
    assert result.losses[1] == plain.losses[1]  # same first forward
    assert result.losses[2] == pytest.approx(plain.losses[2], rel=1e-3)  # bf16-rounded gradients after


def test_decoupled_lr_in_the_trainer(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "4",
        "--eval-iters",
        "0",
        "--decoupled-lr",
        "5e-3",
        "--decoupled-min-lr",
        "5e-4",
        "--lr-decay-style",
        "linear",
    )
    trainer = Trainer(load_config(argv), stream=io.StringIO())
    try:
        trainer.train(stop_after=2)
        by_name = {name: group["lr"] for group in trainer.optimizer.param_groups for name in group["names"]}
    finally:
        trainer.close()
    embedding = [name for name in by_name if name.endswith("embed_tokens.weight")]
    assert embedding and by_name[embedding[0]] == pytest.approx(5e-4 + 0.5 * 4.5e-3)  # halfway to the floor
    others = [lr for name, lr in by_name.items() if not name.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert others and all(lr == pytest.approx(0.5e-3) for lr in others)


def test_manual_gc_disables_the_collector_and_collects_on_schedule(
    data_prefix: str, sentencepiece_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import megalign.training.run_controls as controls

    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--train-iters",
        "4",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--manual-gc",
        "--manual-gc-interval",
        "3",
    )
    enabled_during, collected = [], []
    real_collect = gc.collect
    monkeypatch.setattr(controls.gc, "collect", lambda *a: (collected.append(gc.isenabled()), real_collect())[1])
    trainer = Trainer(load_config(argv), stream=io.StringIO())
    forward = trainer.model.chunks[0].forward
    trainer.model.chunks[0].forward = lambda *a, **k: (enabled_during.append(gc.isenabled()), forward(*a, **k))[1]
    try:
        trainer.train()
    finally:
        trainer.close()
    assert gc.isenabled() and not any(enabled_during)
    # start, step 3, and two around each of the evaluations at steps 2 and 4
    assert len(collected) == 1 + 1 + 4 and not any(collected)
    quiet = GarbageCollection(load_config(_BASE + ["--train-iters", "2", "--manual-gc", "--no-manual-gc-eval"]).misc)
    quiet.around_evaluation()
    assert quiet.collections == 0


def test_empty_cache_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not empty_cache(2, 1, cpu)  # nothing to empty on a CPU
    assert not empty_cache(0, 1, cuda) and not empty_cache(1, 2, cuda)
    assert empty_cache(1, 1, cuda) and empty_cache(2, 2, cuda) and len(calls) == 2


def test_distributed_timeout_reaches_init_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import megalign.parallel.launch as launch

    seen: Dict[str, Any] = {}
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend, timeout: seen.update(b=backend, t=timeout))
    monkeypatch.setattr(launch, "default_device", lambda: torch.device("cpu"))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    launch.init_distributed("gloo", timeout_minutes=37)
    assert seen == {"b": "gloo", "t": datetime.timedelta(minutes=37)}
    assert math.isclose(seen["t"].total_seconds(), 37 * 60)
