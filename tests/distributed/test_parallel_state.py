"""The TP-innermost, then DP, then PP rank layout and its process groups on a real gloo job."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalign.errors import ConfigError
from megalign.parallel.state import ParallelContext, initialize_parallel, rank_layout


def test_rank_layout_matches_megatron_order() -> None:
    layout = rank_layout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout.tensor == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.data == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.pipeline == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.model == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.embedding == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.coordinates(5) == {"tensor": 1, "data": 0, "pipeline": 1, "model": 3, "embedding": 1}
    single = rank_layout(1)
    assert single.tensor == single.data == single.pipeline == single.model == [[0]] and single.embedding == []


@pytest.mark.parametrize("world, tp, pp, needle", [
    (6, 4, 1, "world size 6 must be divisible by --tensor-model-parallel-size 4 x --pipeline-model-parallel-size 1"),
    (8, 2, 3, "= 6 (data parallel = world / (TP x PP))"),
    (4, 0, 1, "--tensor-model-parallel-size must be a positive integer"),
])
def test_rank_layout_errors(world: int, tp: int, pp: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        rank_layout(world, tp, pp)


def test_context_validation() -> None:
    with pytest.raises(ConfigError, match="needs its process group"):
        ParallelContext(2, 0)
    with pytest.raises(ConfigError, match="must be smaller"):
        ParallelContext(1, 1)
    with pytest.raises(ConfigError, match="--sequence-parallel needs --tensor-model-parallel-size > 1"):
        initialize_parallel(1, 1, sequence_parallel=True)
    state = initialize_parallel()  # no torch.distributed job: the single-process state
    assert state.world_size == 1 and state.context == ParallelContext.single() and state.is_logging_rank


def _groups(rank: int, world: int) -> dict:
    state = initialize_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    found = {"coords": (state.tensor_model_parallel_rank, state.data_parallel_rank, state.pipeline_model_parallel_rank)}
    for name, group in (("tensor", state.tensor_group), ("data", state.data_group), ("pipeline", state.pipeline_group),
                        ("model", state.model_group)):
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group)  # the sum of the group's global ranks identifies the group
        found[name] = int(value.item())
    found["logging"] = state.is_logging_rank
    return found


def test_process_groups_on_eight_ranks(distributed) -> None:
    results = distributed(_groups, 8)
    layout = rank_layout(8, 2, 2)
    for rank, found in enumerate(results):
        coords = layout.coordinates(rank)
        assert found["coords"] == (coords["tensor"], coords["data"], coords["pipeline"])
        for name in ("tensor", "data", "pipeline", "model"):
            group = next(g for g in getattr(layout, name) if rank in g)
            assert found[name] == sum(group), (rank, name)
    assert [r for r, found in enumerate(results) if found["logging"]] == [4]  # tp 0, dp 0, last stage


def _agree(rank: int, world: int) -> list:
    from megalign.parallel.launch import any_rank, init_distributed

    assert init_distributed() == torch.device("cpu")  # already initialised by the harness: just the device
    return [any_rank(rank == 1, torch.device("cpu")), any_rank(False, torch.device("cpu"))]


def test_any_rank_and_init_on_a_running_job(distributed) -> None:
    assert distributed(_agree, 3) == [[True, False]] * 3


def test_init_distributed_needs_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from megalign.parallel.launch import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="RANK, MASTER_ADDR, MASTER_PORT is not set: launch with torchrun"):
        init_distributed()
