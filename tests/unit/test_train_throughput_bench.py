"""Smoke test of benchmarks/train_throughput.py on the tiny preset: both sides train the same function,
the results have the structure the report and --json rely on, and the guard rejects differing models.
No timing is asserted (speed targets live in the benchmark, not in tests)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "train_throughput.py")
_SPEC = importlib.util.spec_from_file_location("train_throughput_bench", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up there
_SPEC.loader.exec_module(bench)

TINY = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--threads", "1"]


def test_make_batch_labels_are_next_tokens():
    config, seq, micro = bench.model_config(bench.parse_args(TINY))
    tokens, labels = bench.make_batch(config, seq, micro, seed=7, device=torch.device("cpu"))
    again, _ = bench.make_batch(config, seq, micro, seed=7, device=torch.device("cpu"))
    assert tokens.shape == labels.shape == (2, 32)
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert torch.equal(tokens, again)


def test_run_structure_and_equal_losses(tmp_path):
    args = bench.parse_args(TINY + ["--steps", "2", "--warmup", "1", "--no-memory", "--profile", "3",
                                    "--json", str(tmp_path / "out.json")])
    results = bench.run(args, log=lambda line: None)
    assert results["tokens_per_step"] == 64
    assert results["initial_loss"]["megalign"] == pytest.approx(results["initial_loss"]["hf"], rel=1e-4)
    for name in bench.SIDES:
        side = results["sides"][name]
        assert len(side["step_seconds"]) == 2 and side["tokens_per_second"] > 0
        assert side["first_loss"] == pytest.approx(results["initial_loss"][name], rel=1e-6)
        assert len(side["profile"]) == 3 and all(row["self_cpu_us"] >= 0 for row in side["profile"])
    mine, theirs = results["sides"]["megalign"], results["sides"]["hf"]
    assert mine["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-4)
    # Same update rule and hyper-parameters: after 3 steps the two still compute the same loss.
    assert mine["last_loss"] == pytest.approx(theirs["last_loss"], rel=1e-3)
    assert mine["last_loss"] < mine["first_loss"]
    assert results["ratio"] == pytest.approx(mine["tokens_per_second"] / theirs["tokens_per_second"])
    lines = bench.format_report(results)
    assert any(bench.TARGET in line for line in lines)
    bench.main(TINY + ["--steps", "1", "--warmup", "0", "--no-memory", "--json", str(tmp_path / "main.json")])
    assert json.loads((tmp_path / "main.json").read_text())["sides"]["hf"]["tokens_per_second"] > 0


def test_guard_rejects_models_that_differ():
    args = bench.parse_args(TINY)
    config, seq, micro = bench.model_config(args)
    tokens, labels = bench.make_batch(config, seq, micro, 0, torch.device("cpu"))
    ours, hf = bench.build_pair(config, torch.device("cpu"), seed=0)
    bench.check_same_function(ours, hf, tokens, labels)
    with torch.no_grad():
        hf.model.norm.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="disagree"):
        bench.check_same_function(ours, hf, tokens, labels)


def test_memory_child_subprocess():
    result = bench.peak_memory(bench.parse_args(TINY + ["--memory-steps", "1"]), "megalign")
    assert result["side"] == "megalign" and result["kind"] == "peak RSS growth" and result["bytes"] > 0
