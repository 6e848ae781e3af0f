"""`megalign train` on several gloo ranks: every step's loss equals the single-process run's, at every layout,
and a checkpoint saved at one layout resumes at another as if the layout had never changed."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List

import pytest

from megalign.config import load_config
from megalign.training.trainer import train

STEPS = 4


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return ["--model-preset", "tiny", "--num-layers", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(model), "--data-cache-path", str(cache), "--split", "90,10,0", "--seed", "5",
            "--lr", "2e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", str(2 * STEPS), "--log-interval", "1",
            "--eval-interval", "2", "--eval-iters", "1", "--clip-grad", "0.5", *extra]


def _train_rank(rank: int, world: int, argv: List[str]) -> Dict[str, Dict[int, float]]:
    result = train(load_config(argv), stream=io.StringIO())
    return {"losses": result.losses, "evaluations": result.evaluations, "grad_norms": result.grad_norms}


def _logged(results: List[Dict]) -> Dict[str, Dict[int, float]]:
    """The results of the logging rank (the one whose losses are numbers)."""
    logged = [r for r in results if r["losses"] and all(v == v for v in r["losses"].values())]
    assert logged, results
    return logged[0]


@pytest.fixture(scope="module")
def single(data_prefix: str, sentencepiece_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    cache = tmp_path_factory.mktemp("cache")
    result = train(load_config(_argv(data_prefix, sentencepiece_model, cache, "--train-iters", str(2 * STEPS))),
                   stream=io.StringIO())
    return {"losses": result.losses, "evaluations": result.evaluations, "grad_norms": result.grad_norms,
            "cache": cache}


LAYOUTS = {
    "dp2": ["--train-iters", str(STEPS)],
    "tp2-sp-dp2-zero1": ["--train-iters", str(STEPS), "--tensor-model-parallel-size", "2", "--sequence-parallel",
                         "--use-distributed-optimizer"],
    "tp2-pp2": ["--train-iters", str(STEPS), "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "pp2-interleaved-dp2-overlap": ["--train-iters", str(STEPS), "--pipeline-model-parallel-size", "2",
                                    "--num-layers-per-virtual-pipeline-stage", "1", "--overlap-grad-reduce"],
    "tp4-kv-replicated": ["--train-iters", str(STEPS), "--tensor-model-parallel-size", "4"],
    "pp4": ["--train-iters", str(STEPS), "--pipeline-model-parallel-size", "4"],
    "pp2-uneven-dp2-zero1": ["--train-iters", str(STEPS), "--pipeline-model-parallel-size", "2",
                             "--decoder-first-pipeline-num-layers", "1", "--use-distributed-optimizer"],
}

# The full grid (MEGALIGN_SLOW=1): TP x PP x DP with SP, the distributed optimizer and interleaving where they apply.
GRID = [(tp, pp, dp, sp, zero1, interleaved)
        for tp in (1, 2, 4) for pp in (1, 2, 4) for dp in (1, 2) if tp * pp * dp <= 8
        for sp in ((False, True) if tp > 1 else (False,)) for zero1 in ((False, True) if dp > 1 else (False,))
        for interleaved in ((False, True) if pp == 2 else (False,))]
# CI runs this part of the grid (the rest needs MEGALIGN_SLOW=1): every feature at once on 8 ranks, TP4 with
# sequence parallelism under the interleaved schedule, PP4 over data parallelism with ZeRO-1, and TP2 + SP alone.
CI_GRID = {(2, 2, 2, True, True, True), (4, 2, 1, True, False, True), (1, 4, 2, False, True, False),
           (2, 1, 1, True, False, False)}
assert CI_GRID <= set(GRID)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_losses_equal_the_single_process_run(distributed, single: Dict, data_prefix: str, sentencepiece_model: Path,
                                             layout: str) -> None:
    argv = _argv(data_prefix, sentencepiece_model, single["cache"], *LAYOUTS[layout])
    got = _logged(distributed(_train_rank, 4, argv))
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=2e-5, abs=2e-6), (layout, step)
    for step, loss in got["evaluations"].items():
        assert loss == pytest.approx(single["evaluations"][step], rel=2e-5, abs=2e-6), (layout, step)
    # the global gradient norm (all ranks' shards, replicated parameters counted once) of every step, the first
    # step's included: the gradients agree, not only the losses
    assert sorted(got["grad_norms"]) == list(range(1, STEPS + 1))
    for step, norm in got["grad_norms"].items():
        assert norm == pytest.approx(single["grad_norms"][step], rel=1e-4), (layout, step)


@pytest.mark.parametrize("resume_layout", [["--pipeline-model-parallel-size", "4"],
                                           ["--tensor-model-parallel-size", "4"], []])
def test_checkpoint_resumes_at_another_layout(distributed, single: Dict, data_prefix: str, sentencepiece_model: Path,
                                              tmp_path: Path, resume_layout: List[str]) -> None:
    save = ["--save", str(tmp_path / "ckpt")]
    first = _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters", str(STEPS), *save,
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    _logged(distributed(_train_rank, 4, first))
    resume = _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters", str(2 * STEPS), *save,
                   "--load", str(tmp_path / "ckpt"), *resume_layout)
    if resume_layout:
        got = _logged(distributed(_train_rank, 4, resume))
    else:  # a single process resumes the parallel job's checkpoint
        got = _train_rank(0, 1, resume)
    assert sorted(got["losses"]) == list(range(STEPS + 1, 2 * STEPS + 1))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=2e-5, abs=2e-6), (resume_layout, step)


def test_eight_ranks_save_at_tp2_pp2_dp2_resume_at_tp1_pp4_and_tp4_pp1(distributed, single: Dict, data_prefix: str,
                                                                        sentencepiece_model: Path,
                                                                        tmp_path: Path) -> None:
    save = ["--save", str(tmp_path / "ckpt")]
    first = _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters", str(STEPS), *save,
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--use-distributed-optimizer")
    got = _logged(distributed(_train_rank, 8, first))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=2e-5, abs=2e-6), step
    for layout in (["--pipeline-model-parallel-size", "4"], ["--tensor-model-parallel-size", "4"]):
        resume = _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters", str(2 * STEPS),
                       "--load", str(tmp_path / "ckpt"), *layout)
        got = _logged(distributed(_train_rank, 8, resume))
        assert sorted(got["losses"]) == list(range(STEPS + 1, 2 * STEPS + 1))
        for step, loss in got["losses"].items():
            assert loss == pytest.approx(single["losses"][step], rel=2e-5, abs=2e-6), (layout, step)


@pytest.mark.parametrize("tp, pp, dp, sp, zero1, interleaved",
                         [pytest.param(*layout, marks=() if layout in CI_GRID else pytest.mark.slow) for layout in GRID])
def test_full_layout_grid(distributed, single: Dict, data_prefix: str, sentencepiece_model: Path, tp: int, pp: int,
                          dp: int, sp: bool, zero1: bool, interleaved: bool) -> None:
    flags = ["--train-iters", str(STEPS), "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
             str(pp)]
    flags += ["--sequence-parallel"] * sp + ["--use-distributed-optimizer"] * zero1
    flags += ["--num-layers-per-virtual-pipeline-stage", "1"] * interleaved
    got = _logged(distributed(_train_rank, tp * pp * dp, _argv(data_prefix, sentencepiece_model, single["cache"],
                                                               *flags)))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=2e-5, abs=2e-6), step
        assert got["grad_norms"][step] == pytest.approx(single["grad_norms"][step], rel=1e-4), step
