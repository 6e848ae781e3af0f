"""Saving a checkpoint from every rank of a parallel job, and reading back this rank's shards at any layout.

Who writes what (the format is in format.py):

* model shards: the data-parallel rank 0 of every (tensor, pipeline) position writes
  ``model_tp{t}_pp{p}.safetensors`` with its tensors under their global names;
* optimizer state of the plain optimizer (fp32 masters, moments: whole TP-local tensors, the same on every
  data-parallel rank): the same ranks write ``optim_tp{t}_pp{p}_dp0.safetensors``;
* optimizer state of the distributed optimizer: EVERY data-parallel rank ``d`` writes
  ``optim_tp{t}_pp{p}_dp{d}.safetensors`` with only the flat slices it owns (:class:`FlatShard`, 1-D, under
  the global name; flat-sharded tensors of format.py) and its bucket layout; data-parallel rank 0 adds the
  0-d step counts. Nothing is gathered: a rank writes its own shard, one tensor at a time;
* RNG states: every rank writes ``rng_rank{r}.safetensors``.

A tensor split over tensor parallelism is stored as ``parts`` slices along its split axis; ``parts`` and
this rank's part follow from the local and global shapes (``global / local`` parts; ranks holding the
same part, such as replicated key/value heads, are replicas of it). Replicated tensors (norm weights) are
stored by tensor rank 0 only; flat optimizer slices by the first tensor rank of each part only.

:func:`read_local_shard` reads this rank's TP-local tensor, or only a flat range of it (what a
distributed-optimizer rank owns), from either kind of storage, touching only the stored rows that range
covers. Vocabulary tensors (``VOCAB_TENSORS``) may have other rows than the loading model: the rows both
have are copied, the model's extra rows are zero. Rank 0 gathers every rank's tensor specs, writes ``metadata.json`` and
installs the directory; ``latest_checkpointed_iteration.txt`` moves only after every rank has finished
(barriers around it), so a crash leaves the previous checkpoint in place.
"""

from __future__ import annotations

import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megalign.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    FlatPiece,
    ShardSpec,
    TensorSpec,
    dtype_name,
    iter_dir_name,
    model_file_name,
    optim_file_name,
    rng_file_name,
    vocab_rows_may_differ,
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
from megalign.errors import DataFormatError
from megalign.parallel.state import ParallelState
from megalign.utils.atomic import atomic_write, install_directory

__all__ = ["FlatShard", "local_part", "read_local_shard", "save_sharded_checkpoint"]


@dataclass(frozen=True)
class FlatShard:
    """Flat elements ``[start, stop)`` of a TP-local tensor of shape ``local_shape`` (``tensor``: 1-D, those
    elements), owned by this data-parallel rank; ``bucket`` / ``offset``: its gradient bucket and position."""

    tensor: torch.Tensor
    local_shape: Tuple[int, ...]
    start: int
    stop: int
    bucket: Optional[int] = None
    offset: Optional[int] = None


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


def _flat_specs(
    shards: Mapping[str, FlatShard], fname: str, global_shapes: Mapping[str, Tuple[int, ...]], state: ParallelState
) -> Dict[str, Dict[str, Any]]:
    specs = {}
    for name, shard in shards.items():
        if name not in global_shapes:
            raise ValueError(f"optimizer tensor {name!r} has no global shape; is it a parameter of this model?")
        if tuple(shard.tensor.shape) != (shard.stop - shard.start,):
            raise ValueError(
                f"flat shard {name!r} holds {tuple(shard.tensor.shape)}, not [{shard.start}, {shard.stop})"
            )
        axis, parts, part = local_part(
            shard.local_shape,
            tuple(global_shapes[name]),
            state.tensor_model_parallel_rank,
            state.tensor_model_parallel_size,
        )
        specs[name] = {
            "group": "optimizer",
            "shape": list(global_shapes[name]),
            "dtype": dtype_name(shard.tensor.dtype),
            "axis": axis,
            "parts": parts,
            "flat": {
                "file": fname,
                "part": part,
                "start": shard.start,
                "stop": shard.stop,
                "bucket": shard.bucket,
                "offset": shard.offset,
            },
        }
    return specs


def _first_holder(
    shards: Mapping[str, FlatShard], global_shapes: Mapping[str, Tuple[int, ...]], state: ParallelState
) -> Dict[str, FlatShard]:
    """The flat shards this rank stores: those of the first tensor rank holding each part (no replicas)."""
    mine = {}
    tp_rank, tp_size = state.tensor_model_parallel_rank, state.tensor_model_parallel_size
    for name, shard in shards.items():
        _, parts, _ = local_part(shard.local_shape, tuple(global_shapes.get(name, shard.local_shape)), tp_rank, tp_size)
        if tp_rank % (tp_size // parts) == 0:
            mine[name] = shard
    return mine


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
            if "flat" in s:
                f = s["flat"]
                spec.flat = (spec.flat or []) + [
                    FlatPiece(f["file"], f["part"], f["start"], f["stop"], f["bucket"], f["offset"])
                ]
                continue
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
    optimizer_shards: Optional[Mapping[str, FlatShard]] = None,
    bucket_layout: Optional[Sequence[Mapping[str, Any]]] = None,
    config: Optional[Mapping[str, Any]] = None,
    consumed_samples: int = 0,
    extra: Optional[Mapping[str, Any]] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Collective: every rank calls this with its local tensors (global names); returns the checkpoint path.

    ``global_shapes`` maps every model and optimizer tensor name to its shape in the unsplit model.
    ``optimizer_shards`` (distributed optimizer): this data-parallel rank's flat slices, written by every
    rank into its own ``optim_tp{t}_pp{p}_dp{d}`` file with ``bucket_layout`` recorded; ``optimizer_state``
    then holds what is the same on all data-parallel ranks (step counts), written by rank 0 of them.
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
    d = state.data_parallel_rank
    try:
        if d == 0:
            fname = model_file_name(t, p)
            mine = _mine(model_state, global_shapes, state)
            files[fname] = {"kind": "model", "tensor": t, "pipeline": p, **write_safetensors(tmp / fname, mine)}
            specs.update(_specs(mine, "model", fname, global_shapes, state))
        if d == 0 or optimizer_shards is not None:
            fname = optim_file_name(t, p, d)
            whole = _mine(optimizer_state, global_shapes, state) if d == 0 else {}
            flat = _first_holder(optimizer_shards or {}, global_shapes, state)
            stored = {**whole, **{name: shard.tensor for name, shard in flat.items()}}
            if len(stored) != len(whole) + len(flat):
                raise ValueError("optimizer_state and optimizer_shards share tensor names")
            files[fname] = {"kind": "optimizer", "tensor": t, "pipeline": p, "data": d}
            if optimizer_shards is not None:
                files[fname]["buckets"] = [dict(bucket) for bucket in bucket_layout or []]
            files[fname].update(write_safetensors(tmp / fname, stored))
            specs.update(_specs(whole, "optimizer", fname, global_shapes, state))
            specs.update(_flat_specs(flat, fname, global_shapes, state))
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
    checkpoint: Checkpoint,
    name: str,
    local_shape: Tuple[int, ...],
    global_shape: Tuple[int, ...],
    state: ParallelState,
    flat_range: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """This rank's slice of global tensor ``name`` (shape ``local_shape`` of the model's ``global_shape``),
    whatever layout saved it; with ``flat_range`` ``(a, b)`` only elements ``a:b`` of it, flattened (1-D).

    Reads only the stored rows the request covers. A vocabulary tensor's stored rows may differ from
    ``global_shape[0]`` (rows past the stored ones come back zero); any other shape difference is a
    DataFormatError naming the tensor and both shapes.
    """
    spec = checkpoint.metadata.tensors.get(name)
    if spec is None:
        raise DataFormatError(f"{checkpoint.path}: the checkpoint has no tensor {name!r}")
    stored, wanted = tuple(spec.shape), tuple(global_shape)
    rows_only = len(stored) == len(wanted) >= 1 and stored[1:] == wanted[1:] and vocab_rows_may_differ(name)
    if stored != wanted and not rows_only:
        raise DataFormatError(
            f"{checkpoint.path}: tensor {name} has shape {list(stored)} in the checkpoint, this model's is "
            f"{list(wanted)}; check --model-preset and the shape flags"
        )
    axis, _, part = local_part(
        tuple(local_shape), wanted, state.tensor_model_parallel_rank, state.tensor_model_parallel_size
    )
    box = [(0, n) for n in local_shape]
    if axis is not None:
        box[axis] = (part * local_shape[axis], (part + 1) * local_shape[axis])
    total = math.prod(local_shape)
    start, stop = flat_range if flat_range is not None else (0, total)
    if not 0 <= start <= stop <= total:
        raise ValueError(
            f"flat range {[start, stop]} is out of range for {name!r} with local shape {list(local_shape)}"
        )
    if box and flat_range is not None:  # only the rows of the local tensor that the flat range touches
        row = math.prod(local_shape[1:])
        first, last = (start // row, -(-stop // row)) if row else (0, 0)
        start, stop = start - first * row, stop - first * row
        box[0] = (box[0][0] + first, box[0][0] + last)
    band = _read_rows(checkpoint, name, box, stored)
    if flat_range is None:
        return band
    flat = band.view(-1)[start:stop]
    return flat.clone() if flat.numel() < band.numel() else flat


def _read_rows(checkpoint: Checkpoint, name: str, box: List[Tuple[int, int]], stored: Tuple[int, ...]) -> torch.Tensor:
    """The box of tensor ``name``; rows past the stored ones (vocabulary padding) are zero."""
    if not box or box[0][1] <= stored[0]:
        return checkpoint.read_box(name, box)
    result = torch.zeros([b - a for a, b in box], dtype=getattr(torch, checkpoint.metadata.tensors[name].dtype))
    have = min(box[0][1], stored[0]) - box[0][0]
    if have > 0:
        result[:have] = checkpoint.read_box(name, [(box[0][0], box[0][0] + have), *box[1:]])
    return result
