"""Saving a checkpoint from every rank of a parallel job, and reading back this rank's shards at any layout.

Who writes what (the format is in format.py):

* model shards: the data-parallel rank 0 of every (tensor, pipeline) position writes
  ``model_tp{t}_pp{p}.safetensors`` with its tensors under their global names;
* optimizer state (fp32 masters, moments): the same ranks write ``optim_tp{t}_pp{p}_dp0.safetensors``
  (the optimizers hand over whole, unsharded-over-DP tensors, so one data-parallel copy suffices);
* RNG states: every rank writes ``rng_rank{r}.safetensors``.

A tensor split over tensor parallelism is stored as ``parts`` slices along its split axis; ``parts`` and
this rank's part follow from the local and global shapes (``global / local`` parts; ranks holding the
same part, such as replicated key/value heads, are replicas of it). Replicated tensors (norm weights) are
stored by tensor rank 0 only. Rank 0 gathers every rank's tensor specs, writes ``metadata.json`` and
installs the directory; ``latest_checkpointed_iteration.txt`` moves only after every rank has finished
(barriers around it), so a crash leaves the previous checkpoint in place.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from megalign.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    ShardSpec,
    TensorSpec,
    dtype_name,
    iter_dir_name,
    model_file_name,
    optim_file_name,
    rng_file_name,
)
from megalign.checkpoint.storage import (
    Checkpoint,
    capture_rng_state,
    json_or_raise,
    prune_checkpoints,
    read_latest_step,
    write_metadata,
    write_safetensors,
)
from megalign.parallel.state import ParallelState
from megalign.utils.atomic import atomic_write, install_directory

__all__ = ["local_part", "read_local_shard", "save_sharded_checkpoint"]


def local_part(
    local_shape: Tuple[int, ...], global_shape: Tuple[int, ...], tp_rank: int, tp_size: int
) -> Tuple[Optional[int], int, int]:
    """``(axis, parts, part)`` of a local tensor: the axis where it is smaller than the global tensor (None
    when whole), into how many parts that axis is cut, and which part this tensor rank holds."""
    if tuple(local_shape) == tuple(global_shape):
        return None, 1, 0
    axes = [i for i, (a, b) in enumerate(zip(local_shape, global_shape)) if a != b]
    if len(local_shape) != len(global_shape) or len(axes) != 1 or global_shape[axes[0]] % local_shape[axes[0]]:
        raise ValueError(
            f"local shape {tuple(local_shape)} is not an even slice of global shape "
            f"{tuple(global_shape)} along one axis"
        )
    axis = axes[0]
    parts = global_shape[axis] // local_shape[axis]
    if tp_size % parts:
        raise ValueError(f"{parts} parts along axis {axis} cannot be spread over {tp_size} tensor-parallel ranks")
    return axis, parts, tp_rank // (tp_size // parts)


def _specs(
    tensors: Mapping[str, torch.Tensor],
    group: str,
    fname: str,
    global_shapes: Mapping[str, Tuple[int, ...]],
    state: ParallelState,
) -> Dict[str, Dict[str, Any]]:
    specs = {}
    for name, tensor in tensors.items():
        if name not in global_shapes:
            raise ValueError(f"{group} tensor {name!r} has no global shape; is it a parameter of this model?")
        axis, parts, part = local_part(
            tuple(tensor.shape),
            tuple(global_shapes[name]),
            state.tensor_model_parallel_rank,
            state.tensor_model_parallel_size,
        )
        size = tensor.shape[axis] if axis is not None else 0
        specs[name] = {
            "group": group,
            "shape": list(global_shapes[name]),
            "dtype": dtype_name(tensor.dtype),
            "axis": axis,
            "parts": parts,
            "shard": {"file": fname, "part": part, "start": part * size, "stop": (part + 1) * size},
        }
    return specs


def _mine(
    tensors: Mapping[str, torch.Tensor], global_shapes: Mapping[str, Tuple[int, ...]], state: ParallelState
) -> Dict[str, torch.Tensor]:
    """The tensors this rank stores: all split ones, replicated ones only on tensor rank 0."""
    if state.tensor_model_parallel_rank == 0:
        return dict(tensors)
    return {n: t for n, t in tensors.items() if tuple(t.shape) != tuple(global_shapes.get(n, ()))}


def _merge(gathered: List[Dict[str, Dict[str, Any]]]) -> Dict[str, TensorSpec]:
    merged: Dict[str, TensorSpec] = {}
    for rank_specs in gathered:
        for name, s in rank_specs.items():
            spec = merged.setdefault(
                name, TensorSpec(name, s["group"], tuple(s["shape"]), s["dtype"], s["axis"], s["parts"])
            )
            shard = s["shard"]
            spec.shards.append(ShardSpec(shard["file"], shard["part"], shard["start"], shard["stop"]))
    return merged


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1:
        dist.barrier()


def save_sharded_checkpoint(
    save_dir: str,
    step: int,
    state: ParallelState,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, torch.Tensor],
    global_shapes: Mapping[str, Tuple[int, ...]],
    *,
    config: Optional[Mapping[str, Any]] = None,
    consumed_samples: int = 0,
    extra: Optional[Mapping[str, Any]] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Collective: every rank calls this with its local tensors (global names); returns the checkpoint path.

    ``global_shapes`` maps every model and optimizer tensor name to its shape in the unsplit model.
    """
    root = Path(save_dir)
    tmp_name = [f".{iter_dir_name(step)}.tmp-{uuid.uuid4().hex}"]
    if state.world_size > 1:
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = root / tmp_name[0]
    if state.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier(state)
    t, p = state.tensor_model_parallel_rank, state.pipeline_model_parallel_rank
    files: Dict[str, Dict[str, Any]] = {}
    specs: Dict[str, Dict[str, Any]] = {}
    try:
        if state.data_parallel_rank == 0:
            for group, tensors, fname in (
                ("model", model_state, model_file_name(t, p)),
                ("optimizer", optimizer_state, optim_file_name(t, p, 0)),
            ):
                mine = _mine(tensors, global_shapes, state)
                files[fname] = {
                    "kind": group,
                    "tensor": t,
                    "pipeline": p,
                    **({"data": 0} if group == "optimizer" else {}),
                    **write_safetensors(tmp / fname, mine),
                }
                specs.update(_specs(mine, group, fname, global_shapes, state))
        rng_tensors, rng_info = capture_rng_state()
        files[rng_file_name(state.rank)] = {
            "kind": "rng",
            "rank": state.rank,
            **write_safetensors(tmp / rng_file_name(state.rank), rng_tensors, rng_info),
        }
        gathered: List[Any] = [(files, specs)]
        if state.world_size > 1:
            gathered = [None] * state.world_size
            dist.all_gather_object(gathered, (files, specs))
        if state.rank == 0:
            _write_metadata(tmp, step, state, gathered, config, consumed_samples, extra)
        _barrier(state)
        final = root / iter_dir_name(step)
        if state.rank == 0:
            previous_latest = read_latest_step(root)
            install_directory(tmp, final)
            with atomic_write(root / LATEST_FILE) as handle:
                handle.write(f"{step}\n")
            if keep_last is not None:
                prune_checkpoints(
                    root, keep_last, {step} | ({previous_latest} if previous_latest is not None else set())
                )
    except BaseException:
        if state.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(state)
    return final


def _write_metadata(
    tmp: Path,
    step: int,
    state: ParallelState,
    gathered: List[Any],
    config: Optional[Mapping[str, Any]],
    consumed_samples: int,
    extra: Optional[Mapping[str, Any]],
) -> None:
    files: Dict[str, Dict[str, Any]] = {}
    for rank_files, _ in gathered:
        files.update(rank_files)
    tensors = _merge([rank_specs for _, rank_specs in gathered])
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "consumed_samples": int(consumed_samples),
        "config": json_or_raise(dict(config or {}), "config"),
        "extra": json_or_raise(dict(extra or {}), "extra"),
        "parallel": {
            "tensor": state.tensor_model_parallel_size,
            "pipeline": state.pipeline_model_parallel_size,
            "data": state.data_parallel_size,
        },
        "files": files,
        "tensors": {name: spec.to_json() for name, spec in sorted(tensors.items())},
    }
    write_metadata(tmp, metadata)


def read_local_shard(
    checkpoint: Checkpoint, name: str, local_shape: Tuple[int, ...], global_shape: Tuple[int, ...], state: ParallelState
) -> torch.Tensor:
    """This rank's slice of global tensor ``name`` (shape ``local_shape``), whatever layout saved it."""
    axis, _, part = local_part(
        tuple(local_shape), tuple(global_shape), state.tensor_model_parallel_rank, state.tensor_model_parallel_size
    )
    if axis is None:
        return checkpoint.read_tensor(name)
    size = local_shape[axis]
    return checkpoint.read_tensor(name, axis, part * size, (part + 1) * size)
