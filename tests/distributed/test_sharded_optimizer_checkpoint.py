"""Distributed-optimizer checkpoints are sharded over data parallelism (each rank writes only its slices) and
resume at other layouts and with the other optimizer exactly as the uninterrupted single-process run."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pytest
from test_parallel_training import STEPS, _argv, _logged, _train_rank, single  # noqa: F401 - single: a fixture

from megalign.checkpoint.format import optim_file_name
from megalign.checkpoint.storage import load_checkpoint, open_safetensors


def _assert_resumed_like_single(got: Dict, single: Dict, label: str) -> None:  # noqa: F811 - the fixture's name
    assert sorted(got["losses"]) == list(range(STEPS + 1, 2 * STEPS + 1))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=2e-5, abs=2e-6), (label, step)


def _run(distributed, world: int, argv: List[str]) -> Dict:
    return _train_rank(0, 1, argv) if world == 1 else _logged(distributed(_train_rank, world, argv))


@pytest.mark.parametrize("first_world, first, resume_world, resume", [
    (2, ["--use-distributed-optimizer"], 1, []),  # DP=2 distributed -> DP=1 plain
    (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"], 2,
     ["--use-distributed-optimizer"]),  # TP=2 -> TP=1 (DP=2 both: other buckets, other flat ranges)
    (1, [], 2, ["--use-distributed-optimizer"]),  # DP=1 plain -> DP=2 distributed
], ids=["dp2-zero1-to-dp1-plain", "tp2-dp2-zero1-to-tp1-dp2-zero1", "dp1-plain-to-dp2-zero1"])
def test_resume_across_optimizers_and_layouts(distributed, single: Dict, data_prefix: str,  # noqa: F811
                                              sentencepiece_model: Path, tmp_path: Path, first_world: int,
                                              first: List[str], resume_world: int, resume: List[str]) -> None:
    save = ["--save", str(tmp_path / "ckpt")]
    _run(distributed, first_world, _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters",
                                         str(STEPS), *save, *first))
    got = _run(distributed, resume_world, _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters",
                                                str(2 * STEPS), "--load", str(tmp_path / "ckpt"), *resume))
    _assert_resumed_like_single(got, single, " ".join(first + ["->"] + resume))


def test_distributed_optimizer_files_hold_only_each_ranks_slices(distributed, single: Dict,  # noqa: F811
                                                                 data_prefix: str, sentencepiece_model: Path,
                                                                 tmp_path: Path) -> None:
    argv = _argv(data_prefix, sentencepiece_model, single["cache"], "--train-iters", "2", "--save",
                 str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--bf16")
    distributed(_train_rank, 4, argv)
    with load_checkpoint(tmp_path / "ckpt") as checkpoint:
        meta = checkpoint.metadata
        moments = {name: spec for name, spec in meta.tensors.items() if spec.group == "optimizer" and spec.shape}
        assert {name.split("/")[0] for name in moments} == {"optimizer.master", "optimizer.exp_avg",
                                                            "optimizer.exp_avg_sq"}
        stored = {}
        for t in range(2):
            for d in range(2):
                fname = optim_file_name(t, 0, d)
                handle = open_safetensors(checkpoint.path / fname)
                for name in handle.keys():
                    shape = handle.get_slice(name).get_shape()
                    if name.startswith("optimizer.step/"):
                        assert t == d == 0 and shape == [], (fname, name)  # step counts: once (replicated)
                        continue
                    pieces = [p for p in moments[name].flat if p.file == fname]
                    assert len(pieces) == 1 and shape == [pieces[0].stop - pieces[0].start], (fname, name)
                    stored[fname] = stored.get(fname, 0) + shape[0]
                assert len(meta.files[fname]["buckets"]) >= 1
        # the files add up to exactly one copy of the fp32 state, split about evenly over the two DP ranks
        one_copy = sum(math.prod(spec.shape) for spec in moments.values())
        assert sum(stored.values()) == one_copy
        for t in range(2):
            halves = [stored[optim_file_name(t, 0, d)] for d in range(2)]
            assert abs(halves[0] - halves[1]) <= 0.2 * sum(halves), halves
        for name, spec in moments.items():  # the full tensor assembles from the pieces of both DP ranks
            assert checkpoint.read_tensor(name).shape == spec.shape
