"""Read the two checkpoint formats of Megatron-LM / megatron-core GPT models, tensor by tensor, without
unpickling arbitrary objects.

* ``torch_dist`` (``--ckpt-format torch_dist``, written by ``megatron.core.dist_checkpointing`` through
  torch.distributed.checkpoint): ``ITER/.metadata`` (a pickle of DCP's ``Metadata``: every global tensor's
  shape, dtype and chunks, and where each chunk's bytes lie), ``__{rank}_{i}.distcp`` files of
  ``torch.save``-serialised chunks, ``common.pt`` (the non-sharded items: ``args``, ``iteration``) and
  ``metadata.json``. Decoder layers are stacked along a leading layer axis (``decoder.layers.X`` of shape
  ``[num_layers, ...]``; per-layer keys ``decoder.layers.{i}.X`` when saved as non-homogeneous layers).
* legacy ``torch`` (``--ckpt-format torch``): ``ITER/mp_rank_TT[_PPP]/model_optim_rng.pt``, one
  ``torch.save`` dict per tensor/pipeline rank holding that rank's ``model`` state dict (local layer numbers,
  local tensor-parallel parts), ``args``, ``iteration`` and ``checkpoint_version``.

Both readers serve the same view: :meth:`names` lists global Megatron tensor names with global layer numbers
(``decoder.layers.{i}.self_attention.linear_qkv.weight``), and :meth:`read` returns one whole tensor
assembled from its tensor-parallel parts (``linear_fc1.weight`` as ``[gate; up]``, the torch_dist layout).
Only the chunks / files a tensor lives in are read, and legacy files are memory-mapped.

No pickle: ``.metadata`` is read by :func:`load_dcp_metadata`, an unpickler that admits only
torch.distributed.checkpoint's metadata and plan classes, ``torch.Size``, torch dtypes and layouts, plain
paths
(anything else is an error naming the file and the class); chunks, ``common.pt`` and legacy files are read
by ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` (the saved args), numpy's array
reconstruction (the saved RNG state) and stand-ins for Megatron's enums (plain values) allowed.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import torch

from megalign.errors import DataFormatError

__all__ = ["LATEST_FILE", "DistCheckpoint", "LegacyCheckpoint", "find_iteration", "load_dcp_metadata", "open_megatron"]

LATEST_FILE = "latest_checkpointed_iteration.txt"
PathLike = Union[str, Path]
_LEGACY_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(_\d{3})?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_DCP_CLASSES = {
    "Metadata",
    "MetadataIndex",
    "ChunkStorageMetadata",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
    "_StorageInfo",
    "SavePlan",
    "WriteItem",
    "WriteItemType",
    "TensorWriteData",
}
_NUMPY_GLOBALS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)
_FIX = "; re-copy it from the Megatron-LM run (a partial copy or an interrupted save leaves such files)"


class _Refused(pickle.UnpicklingError):
    """A class outside the allow-list."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits only the classes a torch.distributed.checkpoint ``.metadata`` file is made of."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module in _DCP_MODULES and name in _DCP_CLASSES)
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module in ("torch._utils", "torch.serialization") and name == "_get_layout")
            or (module == "collections" and name == "OrderedDict")
            or (module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath"))  # StorageMeta.checkpoint_id
        )
        if not allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def load_dcp_metadata(path: Path) -> Any:
    """The DCP ``Metadata`` pickled in ``path`` (restricted unpickler, see the module doc)."""
    try:
        with open(path, "rb") as handle:
            metadata = _DCPMetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing; a torch_dist checkpoint directory holds .metadata") from None
    except _Refused as exc:
        raise DataFormatError(
            f"{path}: holds Python class {exc}, which is not torch.distributed.checkpoint metadata; megalign does "
            "not unpickle arbitrary objects (re-save the checkpoint with torch.distributed.checkpoint)"
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise DataFormatError(
            f"{path}: not a readable torch.distributed.checkpoint metadata file ({exc}){_FIX}"
        ) from None
    if not hasattr(metadata, "state_dict_metadata") or not isinstance(metadata.storage_data, dict):
        raise DataFormatError(f"{path}: holds no torch.distributed.checkpoint Metadata{_FIX}")
    return metadata


class _EnumValue:
    """Stand-in for a Megatron enum in saved args: unpickles ``Enum(value)`` as the plain value."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __call__(self, value: Any) -> Any:
        return value


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` of a Megatron file, allowing only the saved-args globals."""
    if not path.is_file():
        raise DataFormatError(f"{path}: missing; a Megatron {what} holds it")
    allowed: List[Any] = [argparse.Namespace]
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - any failure to open the zip archive
        raise DataFormatError(f"{path}: not a readable torch.save file ({exc}){_FIX}") from None
    refused = []
    for name in unsafe:
        module = name.rsplit(".", 1)[0]
        if module.startswith("megatron.") and module.rsplit(".", 1)[-1] == "enums":
            allowed.append((_EnumValue(name), name))
        elif name in _NUMPY_GLOBALS or name.startswith("numpy.dtypes."):  # the saved RNG state's arrays
            module, attr = name.rsplit(".", 1)
            allowed.append((getattr(importlib.import_module(module), attr), name))
            if name == "numpy.dtype":  # the dtype instances it makes are of numpy.dtypes' classes
                dtypes = importlib.import_module("numpy.dtypes")
                allowed += [
                    cls for cls in vars(dtypes).values() if isinstance(cls, type) and cls.__name__.endswith("DType")
                ]
        elif name != "argparse.Namespace":
            refused.append(name)
    if refused:
        raise DataFormatError(
            f"{path}: holds Python objects of {', '.join(sorted(refused))}, which megalign does not unpickle "
            "(torch.load weights_only=True); re-save the checkpoint without them"
        )
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated archives raise RuntimeError, bad pickles UnpicklingError
        raise DataFormatError(f"{path}: cannot be read ({exc}){_FIX}") from None


def _args_of(state: Any, path: Path) -> Dict[str, Any]:
    args = state.get("args") if isinstance(state, dict) else None
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise DataFormatError(f"{path}: 'args' is a {type(args).__name__}, expected Megatron's argparse Namespace")


class DistCheckpoint:
    """A ``torch_dist`` iteration directory (see the module doc)."""

    format = "torch_dist"

    def __init__(self, path: Path) -> None:
        self.path = path
        info_file = path / "metadata.json"
        if info_file.is_file():
            try:
                info = json.loads(info_file.read_text())
            except ValueError as exc:
                raise DataFormatError(f"{info_file}: not valid JSON ({exc}){_FIX}") from None
            backend = info.get("sharded_backend") if isinstance(info, dict) else None
            if backend not in (None, "torch_dist"):
                raise DataFormatError(
                    f"{info_file}: sharded_backend {backend!r} is not supported (only torch_dist); "
                    "re-save the checkpoint with --ckpt-format torch_dist or torch"
                )
        self.metadata = load_dcp_metadata(path / ".metadata")
        common = _torch_load(path / "common.pt", "torch_dist checkpoint") if (path / "common.pt").is_file() else {}
        self.args = _args_of(common, path / "common.pt")
        self.iteration = common.get("iteration") if isinstance(common, dict) else None
        self.args_file = path / "common.pt"
        self._tensors = {
            key: meta for key, meta in self.metadata.state_dict_metadata.items() if hasattr(meta, "chunks")
        }
        self._files: Dict[str, BinaryIO] = {}
        self._storage = {(i.fqn, tuple(i.offset or ())): info for i, info in self.metadata.storage_data.items()}

    def _key(self, name: str) -> Tuple[str, Optional[int]]:
        """(DCP key, layer index into its stacked axis or None) of global tensor ``name``."""
        if name in self._tensors:
            return name, None
        match = _LAYER.match(name)
        if match and f"decoder.layers.{match.group(2)}" in self._tensors:
            return f"decoder.layers.{match.group(2)}", int(match.group(1))
        raise KeyError(name)

    def names(self) -> List[str]:
        """Global tensor names, stacked layers expanded to ``decoder.layers.{i}.X``."""
        out = []
        for key, meta in self._tensors.items():
            if key.endswith(".weight_v"):  # singleton_local_shards' up half, served with the gate half
                continue
            base = key[:-2] if key.endswith(".weight_w") else key
            leaf = base[len("decoder.layers.") :] if base.startswith("decoder.layers.") else None
            if leaf is not None and not leaf.split(".")[0].isdigit():
                out += [f"decoder.layers.{i}.{leaf}" for i in range(meta.size[0])]
            else:
                out.append(base)
        return out

    def shape(self, name: str) -> Tuple[int, ...]:
        """Global shape of ``name`` (from the metadata; nothing is read)."""
        if name.endswith("linear_fc1.weight") and not self._has(name):
            gate = self.shape(name + "_w")
            return (2 * gate[0],) + gate[1:]
        key, layer = self._key(name)
        size = tuple(self._tensors[key].size)
        return size[1:] if layer is not None else size

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        if name.endswith("linear_fc1.weight") and not self._has(name):
            name += "_w"
        return self._tensors[self._key(name)[0]].properties.dtype

    def _has(self, name: str) -> bool:
        try:
            self._key(name)
            return True
        except KeyError:
            return False

    def read(self, name: str, axis: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Global tensor ``name``, or its rows ``[start, stop)`` along ``axis`` (only the chunks holding them
        are read)."""
        if name.endswith("linear_fc1.weight") and not self._has(name):  # singleton_local_shards: _w / _v keys
            whole = torch.cat([self.read(name + "_w"), self.read(name + "_v")])
            return whole if axis is None else whole.narrow(axis, start, stop - start).clone()
        key, layer = self._key(name)
        size = list(self._tensors[key].size)
        offsets = [0] * len(size)
        if layer is not None:
            offsets[0], size[0] = layer, 1
        if axis is not None:
            dim = axis + (layer is not None)
            offsets[dim], size[dim] = start, stop - start
        out = self._read_box(key, offsets, size)
        return out[0] if layer is not None else out

    def _read_box(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        meta = self._tensors[key]
        out = torch.empty(list(sizes), dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            data = self._read_chunk(key, chunk)
            src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))
            out[dst] = data[src]
            covered += data[src].numel()
        if covered != out.numel():
            raise DataFormatError(f"{self.path}: tensor {key} is not fully covered by its stored chunks{_FIX}")
        return out

    def _read_chunk(self, key: str, chunk: Any) -> torch.Tensor:
        info = self._storage.get((key, tuple(chunk.offsets)))
        if info is None:
            raise DataFormatError(f"{self.path / '.metadata'}: no storage entry for a chunk of tensor {key}{_FIX}")
        if getattr(info, "transform_descriptors", None):
            raise DataFormatError(
                f"{self.path / info.relative_path}: tensor {key} is stored with transforms "
                f"{info.transform_descriptors} (e.g. compression), which megalign does not read"
            )
        path = self.path / info.relative_path
        handle = self._files.get(info.relative_path)
        if handle is None:
            try:
                handle = self._files[info.relative_path] = open(path, "rb")
            except FileNotFoundError:
                raise DataFormatError(f"{path}: missing; .metadata places tensor {key} in it{_FIX}") from None
        handle.seek(info.offset)
        data = handle.read(info.length)
        try:
            if len(data) != info.length:
                raise EOFError(f"{len(data)} of {info.length} bytes")
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt bytes
            raise DataFormatError(f"{path}: cannot read tensor {key} at byte {info.offset} ({exc}){_FIX}") from None
        if not isinstance(tensor, torch.Tensor) or list(tensor.shape) != list(chunk.sizes):
            raise DataFormatError(f"{path}: the chunk of tensor {key} at byte {info.offset} has the wrong shape{_FIX}")
        return tensor

    def release(self) -> None:
        """Nothing is mapped: chunks are read into memory and dropped by the caller."""

    def close(self) -> None:
        """Close the open .distcp files."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()


# legacy per-rank tensors: tensor-parallel axis by leaf name (None: replicated)
_LEGACY_AXES = {
    "word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "linear_qkv.weight": 0,
    "linear_qkv.bias": 0,
    "linear_fc1.weight": 0,
    "linear_proj.weight": 1,
    "linear_fc2.weight": 1,
}


def _legacy_axis(name: str) -> Optional[int]:
    for leaf, axis in _LEGACY_AXES.items():
        if name.endswith(leaf):
            return axis
    return None


class LegacyCheckpoint:
    """A legacy ``torch`` iteration directory (see the module doc); files are memory-mapped."""

    format = "torch"

    def __init__(self, path: Path) -> None:
        self.path = path
        ranks: Dict[Tuple[int, int], Path] = {}
        for child in path.iterdir():
            match = _LEGACY_DIR.match(child.name)
            if not match or not child.is_dir():
                continue
            if match.group(3):
                raise DataFormatError(f"{child}: expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not supported")
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = child / "model_optim_rng.pt"
        self.tp = 1 + max(t for t, _ in ranks)
        self.pp = 1 + max(p for _, p in ranks)
        missing = [f"mp_rank_{t:02d}_{p:03d}" for t in range(self.tp) for p in range(self.pp) if (t, p) not in ranks]
        if missing:
            raise DataFormatError(
                f"{path}: rank directory {missing[0]} is missing for a TP {self.tp} x PP {self.pp} run"
            )
        self._files = ranks
        self._loaded: Dict[Tuple[int, int], Dict[str, Any]] = {}  # memory-mapped model state dicts, until release()
        self._meta: Dict[Tuple[int, int], Dict[str, Tuple[Tuple[int, ...], torch.dtype]]] = {}
        self._where: Dict[str, Tuple[int, str]] = {}  # global name -> (pipeline stage, local name)
        self.args_file = ranks[(0, 0)]
        offset = 0
        for p in range(self.pp):
            for t in range(self.tp):
                model = self._model(t, p)
                self._meta[(t, p)] = {
                    k: (tuple(v.shape), v.dtype) for k, v in model.items() if isinstance(v, torch.Tensor)
                }
            local_names = self._meta[(0, p)]
            layers = {int(m.group(1)) for n in local_names if (m := _LAYER.match(n))}
            for local in local_names:
                match = _LAYER.match(local)
                name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}" if match else local
                self._where.setdefault(name, (p, local))
            offset += len(layers)
            self.release()  # only the pickles were read; tensor data is mapped when a tensor is read
        state = _torch_load(self.args_file, "legacy checkpoint")
        self.args = _args_of(state, self.args_file)
        self.iteration = state.get("iteration")
        self.checkpoint_version = state.get("checkpoint_version")
        del state

    def _model(self, t: int, p: int) -> Dict[str, Any]:
        """The ``model`` state dict of rank (t, p), memory-mapped (kept until :meth:`release`)."""
        if (t, p) not in self._loaded:
            path = self._files[(t, p)]
            state = _torch_load(path, "legacy checkpoint")
            if not isinstance(state, dict) or "model" not in state:
                keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
                vpp = isinstance(state, dict) and "model0" in state
                hint = " (virtual pipeline stages are not supported)" if vpp else ""
                raise DataFormatError(f"{path}: has no 'model' state dict (found {keys}){hint}")
            self._loaded[(t, p)] = state["model"]
        return self._loaded[(t, p)]

    def file_of(self, name: str) -> Path:
        """The rank-0 file holding ``name``."""
        return self._files[(0, self._where[name][0])]

    def names(self) -> List[str]:
        """Global tensor names (global layer numbers)."""
        return list(self._where)

    def _check(self, name: str) -> Tuple[int, str]:
        p, local = self._where[name]
        for t in range(self.tp):
            if local not in self._meta[(t, p)]:
                raise DataFormatError(f"{self._files[(t, p)]}: tensor {local} is missing (tensor rank 0 has it)")
        return p, local

    def shape(self, name: str) -> Tuple[int, ...]:
        """Global shape of ``name`` (from the pickles; no tensor data is read)."""
        p, local = self._check(name)
        shapes, axis = [self._meta[(t, p)][local][0] for t in range(self.tp)], _legacy_axis(name)
        shape = list(shapes[0])
        if axis is not None:
            shape[axis] = sum(s[axis] for s in shapes)
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        p, local = self._check(name)
        return self._meta[(0, p)][local][1]

    def read(self, name: str, axis: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Tensor ``name`` (a copy) from its tensor-parallel parts, or its rows ``[start, stop)`` along ``axis``
        (only those are copied when ``axis`` is the split axis); ``linear_fc1.weight`` as ``[gate; up]``."""
        p, local = self._check(name)
        tp_axis = _legacy_axis(name)
        if axis is not None and axis == tp_axis and not name.endswith("linear_fc1.weight"):
            pieces, offset = [], 0
            for t in range(self.tp):
                part = self._model(t, p)[local]
                size = part.shape[axis]
                lo, hi = max(start, offset), min(stop, offset + size)
                if lo < hi:
                    pieces.append(part.narrow(axis, lo - offset, hi - lo))
                offset += size
            return torch.cat(pieces, dim=axis)
        parts = [self._model(t, p)[local] for t in range(self.tp)]
        if tp_axis is None:
            whole = parts[0].clone()
        elif name.endswith("linear_fc1.weight"):  # each rank holds [gate part; up part]
            halves = [part.chunk(2, dim=0) for part in parts]
            whole = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            whole = torch.cat(parts, dim=tp_axis)
        return whole if axis is None else whole.narrow(axis, start, stop - start).clone()

    def release(self) -> None:
        """Unmap the files read so far (pages read stop counting in this process's memory)."""
        self._loaded.clear()

    def close(self) -> None:
        """Drop the memory-mapped state dicts."""
        self.release()


MegatronCheckpoint = Union[DistCheckpoint, LegacyCheckpoint]


def _is_iteration_dir(path: Path) -> bool:
    return (path / ".metadata").is_file() or any(_LEGACY_DIR.match(c.name) for c in path.iterdir() if c.is_dir())


def find_iteration(load: PathLike, step: Optional[int] = None) -> Path:
    """The iteration directory of Megatron checkpoint ``load``: ``load`` itself when it is one, else
    ``iter_{step:07d}`` or the one ``latest_checkpointed_iteration.txt`` names (``release`` too)."""
    root = Path(load)
    what = (
        "is not a Megatron checkpoint (no latest_checkpointed_iteration.txt, iter_NNNNNNN/, .metadata or "
        "mp_rank_*/model_optim_rng.pt); pass --load the --save directory of a Megatron-LM run or one "
        "iter_NNNNNNN/ inside it"
    )
    if not root.is_dir():
        raise DataFormatError(f"--load {root}: not a directory")
    if step is None and _is_iteration_dir(root):
        return root
    if step is not None:
        name = f"iter_{step:07d}"
    else:
        latest = root / LATEST_FILE
        if not latest.is_file():
            raise DataFormatError(f"--load {root}: {what}")
        text = latest.read_text().strip()
        if text != "release" and not text.isdigit():
            raise DataFormatError(f"{latest}: holds {text[:40]!r}, expected an iteration number or 'release'")
        name = "release" if text == "release" else f"iter_{int(text):07d}"
    path = root / name
    if not path.is_dir() or not _is_iteration_dir(path):
        present = sorted(p.name for p in root.glob("iter_*"))
        raise DataFormatError(
            f"--load {root}: no Megatron checkpoint {path.name}/ (present: {', '.join(present) or 'none'}); "
            "choose one with --ckpt-step"
        )
    return path


def open_megatron(path: Path) -> MegatronCheckpoint:
    """The reader for iteration directory ``path`` (torch_dist when it holds .metadata, else legacy)."""
    if (path / ".metadata").is_file():
        return DistCheckpoint(path)
    return LegacyCheckpoint(path)
