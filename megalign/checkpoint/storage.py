"""Save and load resharding-ready checkpoints (format: format.py, docs/training.md).

Saving writes everything into ``SAVE/.iter_NNNNNNN.tmp-<uuid>/``, fsyncs it, renames the directory to
``iter_NNNNNNN`` and only then replaces ``latest_checkpointed_iteration.txt`` atomically, so a crash at
any point leaves either the previous checkpoint or the new, complete one. Loading validates metadata and
every file before returning a :class:`Checkpoint`, which reads global tensor slices lazily through
safetensors' ``safe_open`` from whichever files hold them. :func:`save_checkpoint` is the single-process
writer (one part per tensor; sharded.py writes parallel jobs); the reader assembles any global box of a
tensor split into any number of parts along any axis, or stored as flat pieces (format version 2), reading
only the stored slices the box overlaps. Files are written a tensor at a time (memory: one tensor).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import safetensors
import safetensors.torch
import torch

from megalign.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ITER_DIR_RE,
    LATEST_FILE,
    METADATA_FILE,
    CheckpointMetadata,
    ShardSpec,
    TensorSpec,
    check_file_against_metadata,
    dtype_name,
    iter_dir_name,
    model_file_name,
    optim_file_name,
    parse_metadata,
    plan_box_read,
    plan_flat_read,
    rng_file_name,
)
from megalign.errors import DataFormatError
from megalign.utils.atomic import atomic_write, fsync_dir, install_directory
from megalign.utils.safetensors_stream import StreamingSafetensorsWriter

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors, json strings) for the python, numpy (legacy), torch CPU and CUDA generators."""
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    info = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([key, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]),
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return tensors, info


def restore_rng_state(tensors: Mapping[str, torch.Tensor], info: Mapping[str, str]) -> list[str]:
    """Restore generators captured by :func:`capture_rng_state`; returns the names restored."""
    version, internal, gauss = json.loads(info["python"])
    random.setstate((version, tuple(internal), gauss))
    key, keys, pos, has_gauss, cached = json.loads(info["numpy"])
    np.random.set_state((key, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    restored = ["python", "numpy", "torch_cpu"]
    cuda = [
        tensors[k]
        for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    ]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
        restored.append("torch_cuda")
    elif cuda:
        logger.warning(
            "checkpoint holds %d CUDA RNG states but %d CUDA devices are visible; CUDA RNG not restored",
            len(cuda),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )
    return restored


# --------------------------------------------------------------------------------------------- saving
def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write one safetensors file a tensor at a time (one tensor's host copy at most), fsync it and return
    its files-table entry (size). Tied tensors are written once per name."""
    plan = [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()]
    writer = StreamingSafetensorsWriter(path, plan, metadata)
    try:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _unsplit_specs(states: Mapping[str, torch.Tensor], group: str, fname: str) -> dict[str, TensorSpec]:
    """Metadata for tensors stored whole (parts=1) in `fname`."""
    specs = {}
    for name, tensor in states.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{group} state has an invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{group} state {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        specs[name] = TensorSpec(
            name, group, tuple(tensor.shape), dtype_name(tensor.dtype), None, 1, [ShardSpec(fname, 0, 0, 0)]
        )
    return specs


def write_metadata(directory: Path, metadata: Mapping[str, Any]) -> None:
    """Write ``metadata.json`` into the (temporary) checkpoint ``directory`` and make it durable."""
    with open(directory / METADATA_FILE, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, ensure_ascii=False, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(directory)


def open_safetensors(path: Path) -> Any:
    """A lazy safetensors handle (``safe_open``); DataFormatError naming the file when it cannot be opened."""
    try:
        return safetensors.safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise DataFormatError(f"{path}: cannot open safetensors file: {exc}") from None


def json_or_raise(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {what} must be JSON-serialisable (finite numbers, str keys): {exc}") from None


def save_checkpoint(
    save_dir: PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    consumed_samples: int = 0,
    extra: Mapping[str, Any] | None = None,
    rng: bool | tuple[dict[str, torch.Tensor], dict[str, str]] = True,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` under `save_dir` atomically and point `latest` at it; returns its path.

    `model_state` and `optimizer_state` map global tensor names (e.g. ``decoder.layers.3.mlp.fc1.weight``,
    ``optimizer.exp_avg/decoder.layers.3.mlp.fc1.weight``) to tensors; the two name sets must not overlap.
    `config`, `consumed_samples` and `extra` (scheduler/scaler state, data position) go into metadata.json.
    `rng`: True captures the generators now; a :func:`capture_rng_state` result taken earlier is saved as
    given (background saves); False saves none.
    With `keep_last`, older ``iter_*`` directories beyond the newest `keep_last` are deleted (never the one
    just written nor the one ``latest`` pointed to before).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    optimizer_state = optimizer_state or {}
    model_file, optim_file = model_file_name(0, 0), optim_file_name(0, 0, 0)
    specs = _unsplit_specs(model_state, "model", model_file)
    optim_specs = _unsplit_specs(optimizer_state, "optimizer", optim_file)
    clash = sorted(set(specs) & set(optim_specs))
    if clash:
        raise ValueError(f"model and optimizer state share tensor names {clash[:3]}; prefix optimizer names")
    specs.update(optim_specs)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "consumed_samples": int(consumed_samples),
        "saved_at": time.time(),
        "config": json_or_raise(dict(config or {}), "config"),
        "extra": json_or_raise(dict(extra or {}), "extra"),
        "parallel": {"tensor": 1, "pipeline": 1, "data": 1},
    }

    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    previous_latest = read_latest_step(root)
    tmp = root / f".{iter_dir_name(step)}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files = {
            model_file: {
                "kind": "model",
                "tensor": 0,
                "pipeline": 0,
                **write_safetensors(tmp / model_file, model_state),
            },
            optim_file: {
                "kind": "optimizer",
                "tensor": 0,
                "pipeline": 0,
                "data": 0,
                **write_safetensors(tmp / optim_file, optimizer_state),
            },
        }
        if rng is not False:
            rng_tensors, rng_info = capture_rng_state() if rng is True else rng
            files[rng_file_name(0)] = {
                "kind": "rng",
                "rank": 0,
                **write_safetensors(tmp / rng_file_name(0), rng_tensors, rng_info),
            }
        write_metadata(tmp, {**header, "files": files, "tensors": {name: s.to_json() for name, s in specs.items()}})
        final = root / iter_dir_name(step)
        install_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_write(root / LATEST_FILE) as handle:
        handle.write(f"{step}\n")
    if keep_last is not None:
        prune_checkpoints(
            root, keep_last, protect={step} | ({previous_latest} if previous_latest is not None else set())
        )
    logger.info("saved checkpoint %s (%d tensors)", final, len(specs))
    return final


def prune_checkpoints(root: Path, keep_last: int, protect: set[int]) -> None:
    """Delete iter_ directories older than the newest `keep_last`, except the protected steps."""
    steps = list_checkpoints(root)
    keep = set(steps[-keep_last:]) | protect
    for step in steps:
        if step in keep:
            continue
        doomed = root / f".{iter_dir_name(step)}.deleting-{uuid.uuid4().hex}"
        (root / iter_dir_name(step)).rename(doomed)  # a half-deleted dir must not look like a checkpoint
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("deleted old checkpoint %s (keep_last=%d)", root / iter_dir_name(step), keep_last)


# -------------------------------------------------------------------------------------------- loading
def list_checkpoints(load_dir: PathLike) -> list[int]:
    """Steps of the ``iter_*`` directories in `load_dir`, ascending (temp and deleting dirs excluded)."""
    root = Path(load_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := ITER_DIR_RE.match(p.name)))


def read_latest_step(load_dir: PathLike) -> int | None:
    """The step in ``latest_checkpointed_iteration.txt``, or None when the file does not exist."""
    path = Path(load_dir) / LATEST_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from None
    if not text.isdigit():
        raise DataFormatError(f"{path}: expected a step number, found {text[:40]!r}")
    return int(text)


class Checkpoint:
    """A validated checkpoint directory; tensors are read lazily, any global slice from any layout."""

    def __init__(self, path: Path, metadata: CheckpointMetadata) -> None:
        self.path = path
        self.metadata = metadata
        self._handles: dict[str, Any] = {}

    @property
    def step(self) -> int:
        return self.metadata.step

    @property
    def consumed_samples(self) -> int:
        return self.metadata.consumed_samples

    @property
    def config(self) -> dict[str, Any]:
        return self.metadata.config

    @property
    def extra(self) -> dict[str, Any]:
        return self.metadata.extra

    def tensor_names(self, group: str | None = None) -> list[str]:
        """Global tensor names, optionally only those of `group` ("model" or "optimizer")."""
        return [n for n, s in self.metadata.tensors.items() if group is None or s.group == group]

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            self._handles[fname] = open_safetensors(self.path / fname)
        return self._handles[fname]

    def read_tensor(self, name: str, axis: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Global tensor `name`, or its slice ``[start, stop)`` along `axis`, assembled from its shards."""
        spec = self._spec(name)
        box = [(0, n) for n in spec.shape]
        if axis is not None:
            if not 0 <= axis < len(spec.shape):
                raise ValueError(f"axis {axis} is out of range for {name!r} with shape {list(spec.shape)}")
            box[axis] = (start, spec.shape[axis] if stop is None else stop)
        return self.read_box(name, box)

    def _spec(self, name: str) -> TensorSpec:
        spec = self.metadata.tensors.get(name)
        if spec is None:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}")
        return spec

    def read_box(self, name: str, box: list[tuple[int, int]]) -> torch.Tensor:
        """The global box ``[start, stop)`` per dim of tensor `name`, reading only the stored slices it overlaps."""
        spec = self._spec(name)
        if len(box) != len(spec.shape) or not all(0 <= a <= b <= n for (a, b), n in zip(box, spec.shape)):
            raise ValueError(f"box {box} is out of range for {name!r} with shape {list(spec.shape)}")
        result = torch.empty([b - a for a, b in box], dtype=getattr(torch, spec.dtype))
        if result.numel() == 0 and spec.shape:
            return result
        if spec.flat is not None:
            for read in plan_flat_read(spec, box):
                band = torch.empty(read.band_shape, dtype=result.dtype)
                flat = band.view(-1)
                for fname, stored, into in read.pieces:
                    flat[into] = self._get(fname, name, stored)
                result[read.out] = band[read.local]
            return result
        for piece in plan_box_read(spec, box):
            result[piece.out] = self._get(piece.file, name, piece.local if spec.shape else None)
        return result

    def _get(self, fname: str, name: str, index: Any) -> torch.Tensor:
        """Slice ``index`` of tensor `name` in `fname` (None: the whole tensor), read lazily."""
        handle = self._open(fname)
        try:
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as exc:
            raise DataFormatError(f"{self.path / fname}: cannot read tensor {name!r}: {exc}") from None

    def model_state(self) -> dict[str, torch.Tensor]:
        """All model tensors, whole."""
        return {name: self.read_tensor(name) for name in self.tensor_names("model")}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """All optimizer tensors (master weights, moments), whole."""
        return {name: self.read_tensor(name) for name in self.tensor_names("optimizer")}

    def restore_rng(self, rank: int = 0) -> list[str]:
        """Restore the RNG states saved by `rank`; returns the generators restored."""
        fname = rng_file_name(rank)
        if fname not in self.metadata.files:
            raise DataFormatError(
                f"{self.path / METADATA_FILE}: no RNG state for rank {rank} (saved with rng=False or by fewer ranks)"
            )
        handle = self._open(fname)
        try:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return restore_rng_state(tensors, handle.metadata() or {})
        except (KeyError, ValueError, TypeError) as exc:
            raise DataFormatError(f"{self.path / fname}: malformed RNG state: {exc!r}") from None

    def close(self) -> None:
        """Release open file handles."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint(load_dir: PathLike, step: int | None = None) -> Checkpoint:
    """Open and validate the checkpoint `step` (default: the one ``latest`` points to) in `load_dir`."""
    root = Path(load_dir)
    if step is None:
        step = read_latest_step(root)
        if step is None:
            raise DataFormatError(f"{root / LATEST_FILE}: missing; {root} holds no completed checkpoint")
    directory = root / iter_dir_name(step)
    if not directory.is_dir():
        raise DataFormatError(f"{directory}: checkpoint directory for step {step} does not exist")
    metadata = parse_metadata(directory / METADATA_FILE)
    if metadata.step != step:
        raise DataFormatError(f"{directory / METADATA_FILE}: records step {metadata.step}, expected {step}")
    for fname in metadata.files:
        check_file_against_metadata(directory, fname, metadata)
    return Checkpoint(directory, metadata)


def find_latest_valid(load_dir: PathLike) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that validates, not newer than ``latest``, and the problems met on the way.

    The trainer loads the returned checkpoint and prints the problems, so that a user sees why it fell
    back to an older step. Returns ``(None, problems)`` when no checkpoint validates.
    """
    root = Path(load_dir)
    problems: list[str] = []
    steps = list_checkpoints(root)[::-1]
    try:
        latest = read_latest_step(root)
    except DataFormatError as exc:
        problems.append(str(exc))
        latest = None
    if latest is not None:
        if latest not in steps:
            problems.append(f"{root / LATEST_FILE}: points to step {latest}, but {iter_dir_name(latest)} is missing")
        steps = [s for s in steps if s <= latest]
    for step in steps:
        try:
            checkpoint = load_checkpoint(root, step)
        except DataFormatError as exc:
            problems.append(str(exc))
            logger.warning("skipping invalid checkpoint: %s", exc)
            continue
        return checkpoint, problems
    return None, problems
