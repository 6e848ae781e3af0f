"""Training-behaviour flags on gloo ranks: --calculate-per-token-loss at DP=2 equals DP=1, --grad-reduce-in-bf16
reduces in bf16 to the fp32 result, --overlap-param-gather trains as without it, and --exit-duration-in-mins
stops every rank at the same step."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from megalign.config import load_config
from megalign.training.trainer import Trainer, train

STEPS = 3


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return [
        "--model-preset",
        "tiny",
        "--num-layers",
        "2",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
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
        "5",
        "--lr",
        "2e-3",
        "--lr-warmup-iters",
        "1",
        "--train-iters",
        str(STEPS),
        "--log-interval",
        "1",
        "--eval-interval",
        str(STEPS),
        "--eval-iters",
        "1",
        "--eod-mask-loss",
        *extra,
    ]


def _train_rank(rank: int, world: int, argv: List[str]) -> Dict[str, Dict[int, float]]:
    result = train(load_config(argv), stream=io.StringIO())
    return {"losses": result.losses, "evaluations": result.evaluations, "grad_norms": result.grad_norms}


def _assert_same(got: Dict[str, Dict[int, float]], want: Dict[str, Dict[int, float]]) -> None:
    for key in ("losses", "evaluations", "grad_norms"):
        assert sorted(got[key]) == sorted(want[key]), key
        for step, value in got[key].items():
            assert value == pytest.approx(want[key][step], rel=2e-5, abs=2e-6), (key, step)


def test_per_token_loss_dp2_equals_dp1(
    distributed, data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--calculate-per-token-loss")
    single = train(load_config(argv), stream=io.StringIO())
    mean_of_means = train(load_config([a for a in argv if a != "--calculate-per-token-loss"]), stream=io.StringIO())
    assert single.losses[1] != mean_of_means.losses[1]  # masked EOD tokens: uneven counts per micro-batch
    want = {"losses": single.losses, "evaluations": single.evaluations, "grad_norms": single.grad_norms}
    got = distributed(_train_rank, 2, argv)
    for rank_result in got:  # DP only: both ranks log the global batch's loss
        _assert_same(rank_result, want)


def _bf16_reduction(rank: int, world: int) -> Dict[str, Any]:
    from megalign.parallel.data_parallel import DataParallelGrads

    group = torch.distributed.new_group(list(range(world)))
    out: Dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
        grads = DataParallelGrads([("w", params[0]), ("b", params[1])], group=group, grad_dtype=dtype)
        torch.manual_seed(100 + rank)  # each rank's own gradients
        for param in params:
            param.grad = torch.randn_like(param)
            grads._on_grad(param)
        grads.finish_grad_sync()
        out[str(dtype)] = [param.main_grad.clone() for param in params]
        out[f"{dtype} buffers"] = [buffer.data.dtype for buffer in grads.buffers]
        grads.close()
    return out


def test_grad_reduce_in_bf16_matches_the_fp32_reduction(distributed, tmp_path: Path) -> None:
    results = distributed(_bf16_reduction, 2)
    for result in results:
        assert result["torch.bfloat16 buffers"] == [torch.bfloat16]
        assert result["torch.float32 buffers"] == [torch.float32]
        for fp32, bf16 in zip(result["torch.float32"], result["torch.bfloat16"]):
            assert bf16.dtype == torch.bfloat16
            torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=2e-2)  # bf16 rounding, twice
            assert not torch.equal(bf16.float(), fp32)  # the reduction really ran in bf16
    torch.testing.assert_close(results[0]["torch.bfloat16"], results[1]["torch.bfloat16"], rtol=0, atol=0)


def test_overlap_param_gather_trains_as_without(
    distributed, data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    argv = _argv(
        data_prefix, sentencepiece_model, tmp_path / "cache", "--use-distributed-optimizer", "--overlap-grad-reduce"
    )
    plain = distributed(_train_rank, 2, argv)
    gathered = distributed(_train_rank, 2, argv + ["--overlap-param-gather"])
    for a, b in zip(plain, gathered):
        assert a == b


def _in_flight_rank(rank: int, world: int, argv: List[str]) -> Dict[str, Any]:
    """One step with --overlap-param-gather: what is in flight after it, and after the next forward pass."""
    from megalign.training import batches

    trainer = Trainer(load_config(argv), stream=io.StringIO())
    try:
        optimizer = trainer.optimizer
        stream = trainer._micro_batches(trainer.train_data, 0)
        trainer.train_step(batches.take(stream, trainer.num_microbatches, "training"))  # warm-up: learning rate 0
        optimizer.finish_param_gather()
        before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        micro = batches.take(stream, trainer.num_microbatches, "training")
        trainer.train_step(micro)
        pending = len(optimizer._pending_gathers)
        # fp32 masters are views of this rank's shard, which the step updates in place; the rest waits
        mid = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        changed = any(not torch.equal(before[n], mid[n]) for n in mid)
        with torch.no_grad():  # the forward's pre-hooks wait for each bucket's gather as its modules run
            trainer.model.chunks[0](**batches.model_inputs(micro[0], torch.device("cpu")))
        after = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        return {"pending": pending, "buckets": len(optimizer.grads.buckets), "changed": changed, "mid": mid,
                "left": len(optimizer._pending_gathers), "after": after}
    finally:
        trainer.close()


def test_overlap_param_gather_leaves_gathers_in_flight_until_the_forward(
    distributed, data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    """After the step every bucket's all-gather is in flight and no parameter has its new value yet; the next
    forward pass finishes them all, giving the parameters of the run without overlap."""
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", "--use-distributed-optimizer",
                 "--overlap-grad-reduce", "--ddp-bucket-size", "20000")
    overlapped = distributed(_in_flight_rank, 2, argv + ["--overlap-param-gather"])
    plain = distributed(_in_flight_rank, 2, argv)
    for ours, reference in zip(overlapped, plain):
        assert ours["buckets"] > 1 and ours["pending"] == ours["buckets"] and ours["left"] == 0
        assert reference["pending"] == 0 and reference["changed"]
        # right after the step the other rank's updates have not arrived; after the forward they have
        assert any(not torch.equal(ours["mid"][name], value) for name, value in reference["mid"].items())
        for name, value in reference["after"].items():
            torch.testing.assert_close(ours["after"][name], value, rtol=0, atol=0)


def _exit_rank(rank: int, world: int, argv: List[str]) -> Dict[str, Any]:
    trainer = Trainer(load_config(argv), stream=io.StringIO())
    now = [0.0]
    trainer.clock = lambda: now[0]
    forward = trainer.model.chunks[0].forward

    def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
        now[0] += 40.0 if rank == 1 else 1.0  # rank 1 is slow: only its clock passes the limit
        return forward(*args, **kwargs)

    trainer.model.chunks[0].forward = timed
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return {"iteration": result.iteration, "out_of_time": result.out_of_time, "checkpoint": result.checkpoint}


def test_exit_duration_stops_every_rank_at_the_same_step(
    distributed, data_prefix: str, sentencepiece_model: Path, tmp_path: Path
) -> None:
    argv = _argv(
        data_prefix,
        sentencepiece_model,
        tmp_path / "cache",
        "--exit-duration-in-mins",
        "1",
        "--save",
        str(tmp_path / "ckpt"),
    )
    argv[argv.index("--train-iters") + 1] = "10"
    results = distributed(_exit_rank, 2, argv)
    # two micro-batches per rank and step: rank 1's clock reads 80 s after step 1, over a minute
    assert [r["iteration"] for r in results] == [1, 1] and all(r["out_of_time"] for r in results)
    assert results[0]["checkpoint"] == results[1]["checkpoint"] is not None
