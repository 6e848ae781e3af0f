"""Checkpoints written by every rank of a TP x PP x DP job, read back whole and at other layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from megalign.checkpoint.format import optim_file_name
from megalign.checkpoint.sharded import FlatShard, local_part, read_local_shard, save_sharded_checkpoint
from megalign.checkpoint.storage import load_checkpoint, open_safetensors, read_latest_step
from megalign.parallel.state import ParallelState, initialize_parallel

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


def _dp_range(numel: int, dp: int, rank: int) -> Tuple[int, int]:
    """A distributed-optimizer-like split of a flattened local tensor: rank ``rank``'s contiguous share."""
    share = -(-numel // dp)
    return min(rank * share, numel), min((rank + 1) * share, numel)


def _save_flat_rank(rank: int, world: int, save_dir: str, tp: int) -> Dict[str, int]:
    state = initialize_parallel(tensor_model_parallel_size=tp)
    dp, dp_rank = state.data_parallel_size, state.data_parallel_rank
    tensors = _globals(0)
    model = {n: _local(t, a, tp, state.tensor_model_parallel_rank) for n, (t, a) in tensors.items()}
    shards = {}
    for name, local in model.items():
        start, stop = _dp_range(local.numel(), dp, dp_rank)
        if start < stop:
            shards[f"optimizer.exp_avg/{name}"] = FlatShard(3 * local.reshape(-1)[start:stop], tuple(local.shape),
                                                            start, stop, 0, start)
    step = {f"optimizer.step/{n}": torch.tensor(4.0) for n in model}
    shapes = {n: tuple(t.shape) for n, (t, _) in tensors.items()}
    shapes.update({f"optimizer.{kind}/{n}": (s if kind == "exp_avg" else ()) for n, s in list(shapes.items())
                   for kind in ("exp_avg", "step")})
    layout = [{"index": 0, "dtype": "float32", "range": [0, 64], "shard": [32 * dp_rank, 32 * dp_rank + 32]}]
    save_sharded_checkpoint(save_dir, 3, state, model, step, shapes, optimizer_shards=shards, bucket_layout=layout)
    return {"dp": dp_rank, "tp": state.tensor_model_parallel_rank,
            "elements": sum(s.stop - s.start for s in shards.values())}


def test_flat_optimizer_shards_are_written_per_dp_rank_and_read_at_any_layout(distributed, tmp_path: Path) -> None:
    save_dir = tmp_path / "ckpt"
    ranks = distributed(_save_flat_rank, 4, str(save_dir), 2)  # TP2 x DP2
    assert all(r["elements"] > 0 for r in ranks)
    with load_checkpoint(save_dir) as checkpoint:
        meta = checkpoint.metadata
        assert checkpoint.metadata.raw["format_version"] == 2
        for t in range(2):
            for d in range(2):  # every data-parallel rank wrote its own optimizer file, with its bucket layout
                fname = optim_file_name(t, 0, d)
                assert meta.files[fname]["data"] == d
                assert meta.files[fname]["buckets"][0]["shard"] == [32 * d, 32 * d + 32]
                handle = open_safetensors(checkpoint.path / fname)
                flat = [n for n in handle.keys() if n.startswith("optimizer.exp_avg/")]
                # only this rank's slices: 1-D, exactly the pieces the metadata records for this file
                for name in flat:
                    pieces = [p for p in meta.tensors[name].flat if p.file == fname]
                    assert len(pieces) == 1 and handle.get_slice(name).get_shape() == [pieces[0].stop - pieces[0].start]
                assert all(n.startswith("optimizer.step/") for n in handle.keys() if n not in flat)
                assert (t == d == 0) == any(n.startswith("optimizer.step/") for n in handle.keys())  # once
        for name, (tensor, axis) in _globals(0).items():
            spec = meta.tensors[f"optimizer.exp_avg/{name}"]
            assert spec.flat is not None and not spec.shards
            # one copy: the pieces add up to the tensor (replicated tensors stored by TP rank 0 only)
            assert sum(p.stop - p.start for p in spec.flat) == tensor.numel(), name
            assert torch.equal(checkpoint.read_tensor(f"optimizer.exp_avg/{name}"), 3 * tensor), name
            assert checkpoint.read_tensor(f"optimizer.step/{name}").item() == 4.0
            for new_tp in (1, 2, 4):  # any TP, any DP split of the new local tensor, only the flat range read
                for new_rank in range(new_tp):
                    view = ParallelState(world_size=new_tp, tensor_model_parallel_size=new_tp,
                                         tensor_model_parallel_rank=new_rank)
                    local = _local(tensor, axis, new_tp, new_rank)
                    for new_dp in (1, 3):
                        for dp_rank in range(new_dp):
                            start, stop = _dp_range(local.numel(), new_dp, dp_rank)
                            got = read_local_shard(checkpoint, f"optimizer.exp_avg/{name}", tuple(local.shape),
                                                   tuple(tensor.shape), view, flat_range=(start, stop))
                            assert torch.equal(got, 3 * local.reshape(-1)[start:stop]), (name, new_tp, new_dp)
                    whole = read_local_shard(checkpoint, f"optimizer.exp_avg/{name}", tuple(local.shape),
                                             tuple(tensor.shape), view)
                    assert torch.equal(whole, 3 * local), (name, new_tp)
