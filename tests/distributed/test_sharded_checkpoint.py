"""Checkpoints written by every rank of a TP x PP x DP job, read back whole and at other layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from megalign.parallel.state import ParallelState, initialize_parallel
from megalign.checkpoint.storage import load_checkpoint, read_latest_step
from megalign.checkpoint.sharded import local_part, read_local_shard, save_sharded_checkpoint

KV_PARTS = 2  # like a model with 2 key/value heads: replicated when TP = 4


def _globals(stage: int) -> Dict[str, Tuple[torch.Tensor, int]]:
    """Global tensors of pipeline stage ``stage`` with their split axis (None: replicated)."""
    g = torch.Generator().manual_seed(stage)
    return {f"layers.{stage}.column.weight": (torch.randn(8, 4, generator=g), 0),
            f"layers.{stage}.row.weight": (torch.randn(4, 8, generator=g), 1),
            f"layers.{stage}.norm.weight": (torch.randn(4, generator=g), None),
            f"layers.{stage}.kv.weight": (torch.randn(KV_PARTS * 2, 4, generator=g), -1)}


def _local(full: torch.Tensor, axis, tp: int, rank: int) -> torch.Tensor:
    if axis is None:
        return full
    if axis == -1:  # KV-style: split into KV_PARTS, each part replicated over tp / KV_PARTS ranks
        parts = min(tp, KV_PARTS)
        return full.chunk(parts, dim=0)[rank // (tp // parts)]
    return full.chunk(tp, dim=axis)[rank]


def _save_rank(rank: int, world: int, save_dir: str, tp: int, pp: int) -> str:
    state = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensors = _globals(state.pipeline_model_parallel_rank)
    model = {n: _local(t, a, tp, state.tensor_model_parallel_rank) for n, (t, a) in tensors.items()}
    optimizer = {f"optimizer.exp_avg/{n}": 2 * v for n, v in model.items()}
    shapes = {n: tuple(t.shape) for n, (t, _) in tensors.items()}
    shapes.update({f"optimizer.exp_avg/{n}": s for n, s in list(shapes.items())})
    path = save_sharded_checkpoint(save_dir, 7, state, model, optimizer, shapes, consumed_samples=56,
                                   extra={"note": "x"}, config={"misc": {}})
    return str(path)


@pytest.mark.parametrize("tp, pp", [(2, 2), (4, 1)])
def test_sharded_save_reads_back_whole_and_at_other_layouts(distributed, tmp_path: Path, tp: int, pp: int) -> None:
    save_dir = tmp_path / "ckpt"
    paths = distributed(_save_rank, 4, str(save_dir), tp, pp)
    assert len(set(paths)) == 1 and read_latest_step(save_dir) == 7
    expected = {}
    for stage in range(pp):
        for name, (tensor, _) in _globals(stage).items():
            expected[name] = tensor
            expected[f"optimizer.exp_avg/{name}"] = 2 * tensor
    with load_checkpoint(save_dir) as checkpoint:
        assert checkpoint.step == 7 and checkpoint.consumed_samples == 56 and checkpoint.extra == {"note": "x"}
        assert checkpoint.metadata.parallel == {"tensor": tp, "pipeline": pp, "data": 4 // (tp * pp)}
        state = {**checkpoint.model_state(), **checkpoint.optimizer_state()}
        assert state.keys() == expected.keys()
        for name in expected:
            assert torch.equal(state[name], expected[name]), name
        # read back at other tensor-parallel sizes: each rank's slice
        for new_tp in (1, 2, 4):
            for rank in range(new_tp):
                view = ParallelState(world_size=new_tp, tensor_model_parallel_size=new_tp,
                                     tensor_model_parallel_rank=rank)
                for stage in range(pp):
                    for name, (tensor, axis) in _globals(stage).items():
                        local = _local(tensor, axis, new_tp, rank)
                        got = read_local_shard(checkpoint, name, tuple(local.shape), tuple(tensor.shape), view)
                        assert torch.equal(got, local), (name, new_tp, rank)
        for rank in range(4):
            assert checkpoint.restore_rng(rank)


def test_local_part() -> None:
    assert local_part((8, 4), (8, 4), 1, 2) == (None, 1, 0)
    assert local_part((4, 4), (8, 4), 1, 2) == (0, 2, 1)
    assert local_part((2, 4), (4, 4), 3, 4) == (0, 2, 1)  # two parts over four ranks: ranks 2, 3 hold part 1
    with pytest.raises(ValueError, match="not an even slice"):
        local_part((3, 3), (8, 4), 0, 2)
