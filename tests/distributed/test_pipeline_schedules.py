"""Pipeline schedules: the action orders, and gradients equal to the unsplit model's on a real gloo pipeline."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from megalign.errors import ConfigError
from megalign.parallel.pipeline import (PipelineSpec, interleaved_schedule, no_pipelining_schedule,
                                        one_f_one_b_schedule, run_schedule, schedule_for)
from megalign.parallel.state import initialize_parallel

LAYERS, WIDTH, MICRO_BATCHES, MICRO_BATCH_SIZE = 8, 16, 4, 3


def test_one_f_one_b_order() -> None:
    assert [repr(a) for a in one_f_one_b_schedule(4, 0, 6)] == \
        ["F0.0", "F0.1", "F0.2", "F0.3", "B0.0", "F0.4", "B0.1", "F0.5", "B0.2", "B0.3", "B0.4", "B0.5"]
    assert [repr(a) for a in one_f_one_b_schedule(4, 3, 3)] == ["F0.0", "B0.0", "F0.1", "B0.1", "F0.2", "B0.2"]
    assert [repr(a) for a in no_pipelining_schedule(2)] == ["F0.0", "B0.0", "F0.1", "B0.1"]


def test_interleaved_order_and_requirements() -> None:
    order = interleaved_schedule(2, 0, 4, 2)
    # micro-batches in groups of pp=2 through chunk 0 then chunk 1; each (chunk, mb) once forward, once backward
    assert [repr(a) for a in order[:6]] == ["F0.0", "F0.1", "F1.0", "F1.1", "F0.2", "B1.0"]
    for kind in "FB":
        done = sorted((a.chunk, a.micro_batch) for a in order if a.kind == kind)
        assert done == [(c, m) for c in range(2) for m in range(4)]
    with pytest.raises(ConfigError, match="multiple of --pipeline-model-parallel-size 2"):
        interleaved_schedule(2, 0, 3, 2)


def _layers(seed: int = 0) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    return torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))


def _micro_batch(m: int) -> torch.Tensor:
    return torch.randn(MICRO_BATCH_SIZE, WIDTH, generator=torch.Generator().manual_seed(100 + m))


def _run_layers(layers, indices, x: torch.Tensor) -> torch.Tensor:
    for i in indices:
        x = torch.tanh(layers[i](x))
    return x


def _loss(x: torch.Tensor) -> torch.Tensor:
    return (x ** 2).mean() / MICRO_BATCHES


def _pipeline_rank(rank: int, world: int, num_chunks: int) -> Dict[str, object]:
    state = initialize_parallel(pipeline_model_parallel_size=world)
    spec = PipelineSpec(state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank,
                        state.pipeline_ranks, num_chunks, state.pipeline_group)
    layers = _layers()
    per_stage = LAYERS // spec.num_stages
    mine = {c: range(spec.stage(c) * per_stage, (spec.stage(c) + 1) * per_stage) for c in range(num_chunks)}

    def forward_step(chunk: int, x, m: int) -> torch.Tensor:
        y = _run_layers(layers, mine[chunk], _micro_batch(m) if x is None else x)
        return _loss(y) if spec.stage(chunk) == spec.num_stages - 1 else y

    actions = schedule_for(spec, MICRO_BATCHES)
    losses = run_schedule(spec, actions, forward_step, MICRO_BATCHES, (MICRO_BATCH_SIZE, WIDTH), torch.float32,
                          torch.device("cpu"))
    grads = {i: layers[i].weight.grad.clone() for c in mine for i in mine[c]}
    evaluation = run_schedule(spec, actions, forward_step, MICRO_BATCHES, (MICRO_BATCH_SIZE, WIDTH), torch.float32,
                              torch.device("cpu"), forward_only=True)
    assert all(not v.requires_grad for v in evaluation)
    assert all(torch.equal(layers[i].weight.grad, grads[i]) for i in grads)  # evaluation left gradients alone
    return {"grads": grads, "losses": [float(v) for v in losses], "evaluation": [float(v) for v in evaluation],
            "untouched": [i for i in range(LAYERS) if layers[i].weight.grad is None]}


@pytest.mark.parametrize("world, num_chunks", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_pipeline_gradients_equal_unsplit_model(distributed, world: int, num_chunks: int) -> None:
    reference = _layers()
    expected_losses: List[float] = []
    for m in range(MICRO_BATCHES):
        loss = _loss(_run_layers(reference, range(LAYERS), _micro_batch(m)))
        loss.backward()
        expected_losses.append(loss.item())
    results = distributed(_pipeline_rank, world, num_chunks)
    grads: Dict[int, torch.Tensor] = {}
    for result in results:
        assert not set(result["grads"]) & set(grads)
        grads.update(result["grads"])
        assert sorted(set(result["untouched"]) | set(result["grads"])) == list(range(LAYERS))
    assert sorted(grads) == list(range(LAYERS))
    for i in range(LAYERS):
        torch.testing.assert_close(grads[i], reference[i].weight.grad, rtol=1e-5, atol=1e-7)
    last = results[-1]["losses"]  # the last global stage is on the last rank
    assert last == pytest.approx(expected_losses, rel=1e-6)
    assert results[-1]["evaluation"] == last
    assert all(not r["losses"] for r in results[:-1])


def test_stage_layer_ranges() -> None:
    from megalign.config.layout import stage_layer_ranges

    assert stage_layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(10, 4, first_stage_layers=1, last_stage_layers=3) == \
        [range(0, 1), range(1, 4), range(4, 7), range(7, 10)]
    assert stage_layer_ranges(5, 1) == [range(0, 5)]
    with pytest.raises(ConfigError, match="--num-layers 6 cannot be split into 4 pipeline stages"):
        stage_layer_ranges(6, 4)
    with pytest.raises(ConfigError, match="leaves a stage without layers"):
        stage_layer_ranges(3, 4, first_stage_layers=0)
