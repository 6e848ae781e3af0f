"""Checkpoint format: round trip, atomicity, validation errors, fallback, keep_last, sharded reads."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from megalign.checkpoint import storage as ckpt
from megalign.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    METADATA_FILE,
    ShardSpec,
    TensorSpec,
    iter_dir_name,
)
from megalign.errors import DataFormatError


def _states(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    model = {
        "embedding.word_embeddings.weight": torch.randn(11, 6, generator=gen),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(18, 6, generator=gen).to(torch.bfloat16),
        "decoder.layers.1.mlp.linear_fc1.bias": torch.randn(8, generator=gen).half(),
        "position_ids": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }
    model["output_layer.weight"] = model["embedding.word_embeddings.weight"]  # tied: shares memory
    optim = {f"optimizer.exp_avg/{n}": torch.randn(t.shape, generator=gen) for n, t in model.items()
             if t.is_floating_point()}
    optim["optimizer.step"] = torch.tensor([3], dtype=torch.int32)
    return model, optim


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip_metadata_and_latest(tmp_path: Path) -> None:
    model, optim = _states()
    path = ckpt.save_checkpoint(tmp_path, 5, model, optim, config={"model": {"num_layers": 2}},
                                consumed_samples=40, extra={"scheduler": {"last_lr": 1e-4}})
    assert path == tmp_path / "iter_0000005"
    assert (tmp_path / LATEST_FILE).read_text() == "5\n"
    loaded = ckpt.load_checkpoint(tmp_path)
    _assert_equal(loaded.model_state(), model)
    _assert_equal(loaded.optimizer_state(), optim)
    assert (loaded.step, loaded.consumed_samples) == (5, 40)
    assert loaded.config == {"model": {"num_layers": 2}}
    assert loaded.extra == {"scheduler": {"last_lr": 1e-4}}
    raw = json.loads((path / METADATA_FILE).read_text())
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == FORMAT_VERSION
    assert raw["parallel"] == {"tensor": 1, "pipeline": 1, "data": 1}
    assert set(raw["files"]) == {"model_tp0_pp0.safetensors", "optim_tp0_pp0_dp0.safetensors",
                                 "rng_rank0.safetensors"}
    entry = raw["tensors"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert entry["shape"] == [18, 6] and entry["dtype"] == "bfloat16" and entry["group"] == "model"
    assert entry["split"] == {"axis": None, "parts": 1}
    assert entry["shards"] == [{"file": "model_tp0_pp0.safetensors", "part": 0, "range": None}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    ckpt.save_checkpoint(tmp_path, 9, model, optim)
    assert ckpt.read_latest_step(tmp_path) == 9 and ckpt.list_checkpoints(tmp_path) == [5, 9]
    assert ckpt.load_checkpoint(tmp_path, step=5).step == 5
    # saving the same step again replaces it
    model2, optim2 = _states(seed=1)
    ckpt.save_checkpoint(tmp_path, 9, model2, optim2)
    _assert_equal(ckpt.load_checkpoint(tmp_path).model_state(), model2)


def test_read_tensor_slices_of_unsplit_tensor(tmp_path: Path) -> None:
    model, _ = _states()
    ckpt.save_checkpoint(tmp_path, 1, model, rng=False)
    loaded = ckpt.load_checkpoint(tmp_path)
    weight = model["embedding.word_embeddings.weight"]
    assert torch.equal(loaded.read_tensor("embedding.word_embeddings.weight", axis=0, start=3, stop=7), weight[3:7])
    assert torch.equal(loaded.read_tensor("embedding.word_embeddings.weight", axis=1, start=2), weight[:, 2:])
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        loaded.read_tensor("missing")
    with pytest.raises(ValueError, match="out of range"):
        loaded.read_tensor("position_ids", axis=0, start=3, stop=99)
    with pytest.raises(DataFormatError, match="no RNG state"):
        loaded.restore_rng()


def test_rng_restore_reproduces_draws(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(1)  # move the generators away from their seeds
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)})
    expected = (random.random(), np.random.randn(3).tolist(), torch.randn(4))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restored = ckpt.load_checkpoint(tmp_path).restore_rng()
    assert restored[:3] == ["python", "numpy", "torch_cpu"]
    got = (random.random(), np.random.randn(3).tolist(), torch.randn(4))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optim = _states()
    ckpt.save_checkpoint(tmp_path, 1, model, optim)
    real_save = ckpt.write_safetensors
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "write_safetensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, optim, keep_last=1)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST_FILE, "iter_0000001"])
    assert ckpt.read_latest_step(tmp_path) == 1


def _corrupt_truncate(directory: Path) -> str:
    path = directory / "model_tp0_pp0.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    return "model_tp0_pp0.safetensors"


def _corrupt_header(directory: Path) -> str:
    path = directory / "optim_tp0_pp0_dp0.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    return "optim_tp0_pp0_dp0.safetensors"


def _corrupt_truncate_and_fix_size(directory: Path) -> str:
    """Truncated data with a matching recorded size: the safetensors header check must still catch it."""
    path = directory / "model_tp0_pp0.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    meta = json.loads((directory / METADATA_FILE).read_text())
    meta["files"]["model_tp0_pp0.safetensors"]["size"] = path.stat().st_size
    (directory / METADATA_FILE).write_text(json.dumps(meta))
    return "model_tp0_pp0.safetensors"


def _corrupt_missing(directory: Path) -> str:
    (directory / "rng_rank0.safetensors").unlink()
    return "rng_rank0.safetensors"


def _corrupt_shape(directory: Path) -> str:
    meta = json.loads((directory / METADATA_FILE).read_text())
    meta["tensors"]["position_ids"]["shape"] = [8]
    (directory / METADATA_FILE).write_text(json.dumps(meta))
    return "model_tp0_pp0.safetensors"


def _corrupt_missing_tensor(directory: Path) -> str:
    meta = json.loads((directory / METADATA_FILE).read_text())
    meta["tensors"]["ghost"] = dict(meta["tensors"]["position_ids"])
    (directory / METADATA_FILE).write_text(json.dumps(meta))
    return "model_tp0_pp0.safetensors"


def _corrupt_version(directory: Path) -> str:
    meta = json.loads((directory / METADATA_FILE).read_text())
    meta["format_version"] = 99
    (directory / METADATA_FILE).write_text(json.dumps(meta))
    return METADATA_FILE


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_truncate, "bytes"), (_corrupt_truncate_and_fix_size, "truncated or corrupt"),
    (_corrupt_header, "header"), (_corrupt_missing, "missing"),
    (_corrupt_shape, "shape"), (_corrupt_missing_tensor, "'ghost'.*missing"), (_corrupt_version, "version 99"),
])
def test_corruption_is_reported_and_latest_valid_falls_back(tmp_path: Path, corrupt, message: str) -> None:
    model, optim = _states()
    ckpt.save_checkpoint(tmp_path, 10, model, optim)
    ckpt.save_checkpoint(tmp_path, 20, model, optim)
    fname = corrupt(tmp_path / iter_dir_name(20))
    with pytest.raises(DataFormatError, match=message) as info:
        ckpt.load_checkpoint(tmp_path)
    assert str(tmp_path / iter_dir_name(20) / fname) in str(info.value)
    checkpoint, problems = ckpt.find_latest_valid(tmp_path)
    assert checkpoint is not None and checkpoint.step == 10
    assert len(problems) == 1 and fname in problems[0]
    _assert_equal(checkpoint.model_state(), model)


def test_find_latest_valid_edge_cases(tmp_path: Path) -> None:
    assert ckpt.find_latest_valid(tmp_path) == (None, [])
    with pytest.raises(DataFormatError, match="no completed checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    ckpt.save_checkpoint(tmp_path, 3, {"w": torch.ones(2)})
    (tmp_path / LATEST_FILE).write_text("7\n")  # points to a checkpoint that never completed
    checkpoint, problems = ckpt.find_latest_valid(tmp_path)
    assert checkpoint.step == 3 and "iter_0000007 is missing" in problems[0]
    (tmp_path / LATEST_FILE).write_text("release\n")
    with pytest.raises(DataFormatError, match="expected a step number"):
        ckpt.load_checkpoint(tmp_path)
    assert ckpt.find_latest_valid(tmp_path)[0].step == 3


def test_keep_last(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep_last=2)
    assert ckpt.list_checkpoints(tmp_path) == [2, 3]
    # saving an older step keeps the one `latest` pointed to and the one just written
    ckpt.save_checkpoint(tmp_path, 0, {"w": torch.zeros(2)}, keep_last=1)
    assert ckpt.list_checkpoints(tmp_path) == [0, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, 4, {}, keep_last=0)


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        ckpt.save_checkpoint(tmp_path, 1, {}, extra={"x": object()})
    with pytest.raises(ValueError, match="share tensor names"):
        ckpt.save_checkpoint(tmp_path, 1, {"a": torch.ones(1)}, {"a": torch.ones(1)})
    with pytest.raises(TypeError, match="torch.Tensor"):
        ckpt.save_checkpoint(tmp_path, 1, {"a": [1.0]})
    with pytest.raises(ValueError, match="step"):
        ckpt.save_checkpoint(tmp_path, -1, {})
    assert list(tmp_path.iterdir()) == []


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor], axis: int, parts: int) -> None:
    """Hand-make a checkpoint in which every tensor is split into `parts` files along `axis`."""
    iter_dir = directory / iter_dir_name(4)
    iter_dir.mkdir(parents=True)
    files, specs = {}, {}
    for name, full in tensors.items():
        bounds = np.linspace(0, full.shape[axis], parts + 1).astype(int).tolist() if parts > 1 else None
        bounds = bounds or [0, full.shape[axis]]
        specs[name] = TensorSpec(name, "model", tuple(full.shape), str(full.dtype).replace("torch.", ""), axis,
                                 parts, [])
        for part in range(parts):
            fname = f"model_tp{part}_pp0.safetensors"
            piece = full.narrow(axis, bounds[part], bounds[part + 1] - bounds[part])
            files.setdefault(fname, {})[name] = piece.contiguous()
            specs[name].shards.append(ShardSpec(fname, part, bounds[part], bounds[part + 1]))
            if part == 0:  # a replica of part 0 in another file: the reader uses one copy
                replica = f"model_tp{part}_pp1.safetensors"
                files.setdefault(replica, {})[name] = piece.contiguous()
                specs[name].shards.append(ShardSpec(replica, part, bounds[part], bounds[part + 1]))
    table = {}
    for fname, content in files.items():
        safetensors.torch.save_file(content, str(iter_dir / fname))
        table[fname] = {"kind": "model", "size": (iter_dir / fname).stat().st_size}
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": 4, "consumed_samples": 0,
            "config": {}, "extra": {}, "parallel": {"tensor": parts, "pipeline": 2, "data": 1},
            "files": table, "tensors": {n: s.to_json() for n, s in specs.items()}}
    (iter_dir / METADATA_FILE).write_text(json.dumps(meta))
    (directory / LATEST_FILE).write_text("4\n")


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("split_axis", [0, 1])
def test_sharded_read_assembles_global_slices(tmp_path: Path, parts: int, split_axis: int) -> None:
    tensors = {"w": torch.randn(10, 9), "b16": torch.randn(8, 12).to(torch.bfloat16),
               "ids": torch.arange(6 * 7 * 2, dtype=torch.int32).reshape(6, 7, 2)}
    _write_sharded(tmp_path, tensors, split_axis, parts)
    loaded = ckpt.load_checkpoint(tmp_path)
    _assert_equal(loaded.model_state(), tensors)
    for name, full in tensors.items():
        for axis in (0, 1):
            n = full.shape[axis]
            for start, stop in [(0, n), (1, n - 1), (n // 2 - 1, n // 2 + 2), (n - 1, n), (3, 3)]:
                got = loaded.read_tensor(name, axis=axis, start=start, stop=stop)
                assert torch.equal(got, full.narrow(axis, start, stop - start)), (name, axis, start, stop)


def test_sharded_metadata_with_gap_is_rejected(tmp_path: Path) -> None:
    _write_sharded(tmp_path, {"w": torch.randn(8, 4)}, 0, 2)
    meta_path = tmp_path / iter_dir_name(4) / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["tensors"]["w"]["shards"] = [s for s in meta["tensors"]["w"]["shards"] if s["part"] == 0]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"1 of 2 parts") as info:
        ckpt.load_checkpoint(tmp_path)
    assert str(meta_path) in str(info.value)


# ----- flat-sharded tensors (format version 2), version 1 compatibility, vocabulary rows -----

def _flat_checkpoint(tmp_path: Path) -> Path:
    """A one-process checkpoint whose exp_avg of ``w`` is stored flat-sharded (one piece, DP=1)."""
    from megalign.checkpoint.sharded import FlatShard, save_sharded_checkpoint
    from megalign.parallel.state import ParallelState

    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    shards = {"optimizer.exp_avg/w": FlatShard(2 * w.reshape(-1)[:12], (4, 3), 0, 12, 0, 0)}
    shapes = {"w": (4, 3), "optimizer.exp_avg/w": (4, 3), "optimizer.step/w": ()}
    layout = [{"index": 0, "dtype": "float32", "range": [0, 12], "shard": [0, 12]}]
    path = save_sharded_checkpoint(str(tmp_path), 1, ParallelState(), {"w": w}, {"optimizer.step/w": torch.tensor(1.0)},
                                   shapes, optimizer_shards=shards, bucket_layout=layout)
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["format_version"] == 2 and meta["tensors"]["optimizer.exp_avg/w"]["shards"] == []
    return path


def test_flat_tensors_read_whole_and_by_box(tmp_path: Path) -> None:
    _flat_checkpoint(tmp_path)
    loaded = ckpt.load_checkpoint(tmp_path)
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert torch.equal(loaded.read_tensor("optimizer.exp_avg/w"), 2 * w)
    assert torch.equal(loaded.read_tensor("optimizer.exp_avg/w", 1, 1, 3), 2 * w[:, 1:3])
    assert torch.equal(loaded.read_box("optimizer.exp_avg/w", [(1, 3), (0, 2)]), 2 * w[1:3, :2])
    assert loaded.metadata.files["optim_tp0_pp0_dp0.safetensors"]["buckets"][0]["shard"] == [0, 12]


def _edit_flat(path: Path, edit) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    edit(meta, meta["tensors"]["optimizer.exp_avg/w"]["flat"])
    (path / METADATA_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda meta, flat: flat["pieces"][0].update(range=[1, 12]), "starts at element 1, expected 0"),
    (lambda meta, flat: flat["pieces"][0].update(range=[0, 11]), "cover 11 of 12"),
    (lambda meta, flat: flat.update(format=7), "flat format 1"),
    (lambda meta, flat: flat["pieces"][0].update(file="nowhere.safetensors"), "not listed"),
    (lambda meta, flat: flat["pieces"][0].update(bucket=3), "bucket 3"),
    (lambda meta, flat: meta.update(format_version=1), "needs format version 2"),
    (lambda meta, flat: meta["files"]["optim_tp0_pp0_dp0.safetensors"]["buckets"][0].update(shard=[0, 13]),
     "outside its range"),
])
def test_flat_metadata_is_validated(tmp_path: Path, edit, message: str) -> None:
    path = _flat_checkpoint(tmp_path)
    _edit_flat(path, edit)
    with pytest.raises(DataFormatError, match=message) as info:
        ckpt.load_checkpoint(tmp_path)
    assert str(path / METADATA_FILE) in str(info.value)


def test_flat_piece_of_the_wrong_size_names_file_and_tensor(tmp_path: Path) -> None:
    path = _flat_checkpoint(tmp_path)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["tensors"]["optimizer.exp_avg/w"]["shape"] = [4, 4]
    meta["tensors"]["optimizer.exp_avg/w"]["flat"]["pieces"][0]["range"] = [0, 16]
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"optim_tp0_pp0_dp0.safetensors: tensor 'optimizer.exp_avg/w'"):
        ckpt.load_checkpoint(tmp_path)


def test_version_1_checkpoints_still_load(tmp_path: Path) -> None:
    model, optim = _states()
    path = ckpt.save_checkpoint(tmp_path, 3, model, optim)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["format_version"] = 1
    (path / METADATA_FILE).write_text(json.dumps(meta))
    _assert_equal(ckpt.load_checkpoint(tmp_path).model_state(), model)


def test_vocab_rows_may_differ_other_shapes_may_not(tmp_path: Path) -> None:
    from megalign.checkpoint.sharded import read_local_shard
    from megalign.parallel.state import ParallelState

    gen = torch.Generator().manual_seed(1)
    stored = {"embed_tokens.weight": torch.randn(6, 3, generator=gen), "layers.0.w": torch.randn(6, 3, generator=gen)}
    ckpt.save_checkpoint(tmp_path, 1, stored, {"optimizer.exp_avg/lm_head.weight": stored["layers.0.w"]}, rng=False)
    loaded = ckpt.load_checkpoint(tmp_path)
    one, tp2 = ParallelState(), ParallelState(world_size=2, tensor_model_parallel_size=2, tensor_model_parallel_rank=1)
    more = read_local_shard(loaded, "embed_tokens.weight", (4, 3), (8, 3), tp2)  # rows 4..8 of 8: 6, 7 are padding
    assert torch.equal(more[:2], stored["embed_tokens.weight"][4:]) and not more[2:].any()
    fewer = read_local_shard(loaded, "optimizer.exp_avg/lm_head.weight", (4, 3), (4, 3), one)
    assert torch.equal(fewer, stored["layers.0.w"][:4])
    flat = read_local_shard(loaded, "embed_tokens.weight", (4, 3), (8, 3), tp2, flat_range=(5, 9))
    assert torch.equal(flat, more.reshape(-1)[5:9])
    with pytest.raises(DataFormatError, match=r"tensor layers.0.w has shape \[6, 3\].*this model's is \[8, 3\]"):
        read_local_shard(loaded, "layers.0.w", (8, 3), (8, 3), one)
    with pytest.raises(DataFormatError, match=r"embed_tokens.weight has shape \[6, 3\].*\[6, 4\]"):
        read_local_shard(loaded, "embed_tokens.weight", (6, 4), (6, 4), one)
