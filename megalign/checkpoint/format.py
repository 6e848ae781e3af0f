"""The checkpoint format: metadata schema, file names, safetensors header checks, slice planning.

A checkpoint is a directory ``SAVE/iter_{step:07d}/`` holding ``metadata.json`` and safetensors files.
Every tensor has a *global* name (global layer numbers), a global shape and dtype, and a split
``{"axis": int | None, "parts": int}``. Each part lives in one or more files (replicas) as a tensor
stored under the global name; its ``[start, stop)`` range along the split axis is recorded in the
metadata, so a loader at any parallel layout can assemble whatever global slice it needs.

Format version 2 adds *flat-sharded* tensors (the distributed optimizer's state): each tensor-parallel part
is stored as 1-D pieces, each piece the flat range ``[start, stop)`` of the row-major flattened TP-local
tensor that one data-parallel rank owned (``"flat": {"format": 1, "pieces": [...]}``, see
:class:`FlatPiece`). Version 1 checkpoints (no flat tensors) still load.
This module is pure format logic (no writing, no torch.distributed); storage.py does the I/O.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megalign.errors import DataFormatError

FORMAT_NAME = "megalign-checkpoint"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 2 adds flat-sharded tensors; 1 is read as before
FLAT_FORMAT = 1  # version of the "flat" entry of a tensor
METADATA_FILE = "metadata.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
ITER_DIR_RE = re.compile(r"^iter_(\d{7,})$")
GROUPS = ("model", "optimizer")
MAX_HEADER_BYTES = 100 * 1024 * 1024

# torch dtype name -> (safetensors dtype code, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}


# Tensors whose dim 0 is the padded vocabulary: their row count follows the tensor-parallel size (Megatron's
# padding), so a checkpoint may hold more or fewer rows than the loading model (see vocab_rows_may_differ).
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def vocab_rows_may_differ(name: str) -> bool:
    """Whether tensor ``name`` (a weight, or ``optimizer.<kind>/<weight>``) has padded vocabulary rows."""
    return name.rsplit("/", 1)[-1] in VOCAB_TENSORS


def iter_dir_name(step: int) -> str:
    """Directory name of the checkpoint for `step`."""
    return f"iter_{step:07d}"


def model_file_name(tp: int, pp: int) -> str:
    """File holding the model-weight shards of tensor rank `tp`, pipeline stage `pp`."""
    return f"model_tp{tp}_pp{pp}.safetensors"


def optim_file_name(tp: int, pp: int, dp: int) -> str:
    """File holding master weights and optimizer moments of one (tp, pp, dp) rank."""
    return f"optim_tp{tp}_pp{pp}_dp{dp}.safetensors"


def rng_file_name(rank: int) -> str:
    """File holding the RNG states of global rank `rank`."""
    return f"rng_rank{rank}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    """Format name of a torch dtype; raises ValueError for dtypes the format does not store."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"checkpoint format cannot store dtype {dtype}; supported: {sorted(DTYPES)}")
    return name


@dataclass(frozen=True)
class ShardSpec:
    """One stored part of a tensor: which file holds it and its [start, stop) along the split axis."""

    file: str
    part: int
    start: int
    stop: int


@dataclass(frozen=True)
class FlatPiece:
    """Flat elements ``[start, stop)`` of tensor-parallel part ``part`` (row-major, TP-local), stored 1-D in
    ``file``; ``bucket`` and ``offset`` say where they lay in the saving rank's gradient buckets."""

    file: str
    part: int
    start: int
    stop: int
    bucket: int | None = None
    offset: int | None = None


@dataclass
class TensorSpec:
    """Global description of one tensor and where its parts are stored (``flat``: as flat pieces)."""

    name: str
    group: str
    shape: tuple[int, ...]
    dtype: str
    axis: int | None
    parts: int
    shards: list[ShardSpec] = field(default_factory=list)
    flat: list[FlatPiece] | None = None

    def part_shape(self) -> tuple[int, ...]:
        """Shape of one tensor-parallel part (the whole shape when unsplit)."""
        if self.axis is None:
            return self.shape
        shape = list(self.shape)
        shape[self.axis] //= self.parts
        return tuple(shape)

    def shard_shape(self, shard: ShardSpec) -> tuple[int, ...]:
        """Shape of the stored tensor for `shard`."""
        if self.axis is None:
            return self.shape
        shape = list(self.shape)
        shape[self.axis] = shard.stop - shard.start
        return tuple(shape)

    def to_json(self) -> dict[str, Any]:
        """JSON form used in metadata.json (the name is the key)."""
        entry: dict[str, Any] = {
            "group": self.group,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "split": {"axis": self.axis, "parts": self.parts},
            "shards": [
                {"file": s.file, "part": s.part, "range": None if self.axis is None else [s.start, s.stop]}
                for s in self.shards
            ],
        }
        if self.flat is not None:
            entry["flat"] = {
                "format": FLAT_FORMAT,
                "pieces": [
                    {"file": p.file, "part": p.part, "range": [p.start, p.stop], "bucket": p.bucket, "offset": p.offset}
                    for p in sorted(self.flat, key=lambda p: (p.part, p.start))
                ],
            }
        return entry


def _field(obj: dict, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{path}: {where} is missing the field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int,))):
        raise DataFormatError(f"{path}: {where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _int_list(value: Any, where: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise DataFormatError(f"{path}: {where} must be a list of non-negative integers, got {value!r}")
    return value


def parse_tensor_spec(name: str, obj: Any, path: Path) -> TensorSpec:
    """Validate and parse one entry of metadata['tensors']; errors name the file and the tensor."""
    where = f"tensors[{name!r}]"
    group = _field(obj, "group", str, where, path)
    if group not in GROUPS:
        raise DataFormatError(f"{path}: {where}.group is {group!r}, expected one of {GROUPS}")
    shape = tuple(_int_list(_field(obj, "shape", list, where, path), f"{where}.shape", path))
    dtype = _field(obj, "dtype", str, where, path)
    if dtype not in DTYPES:
        raise DataFormatError(f"{path}: {where}.dtype {dtype!r} is not one of {sorted(DTYPES)}")
    split = _field(obj, "split", dict, where, path)
    axis = split.get("axis")
    parts = _field(split, "parts", int, f"{where}.split", path)
    if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape)):
        raise DataFormatError(f"{path}: {where}.split.axis {axis!r} is not an axis of shape {list(shape)}")
    if parts < 1 or (axis is None and parts != 1):
        raise DataFormatError(f"{path}: {where}.split.parts {parts} is invalid for axis {axis!r}")
    spec = TensorSpec(name, group, shape, dtype, axis, parts)
    if "flat" in obj:
        spec.flat = _parse_flat(spec, obj["flat"], path)
        if obj.get("shards"):
            raise DataFormatError(f"{path}: {where} is flat-sharded but also lists shards")
        return spec
    for i, entry in enumerate(_field(obj, "shards", list, where, path)):
        swhere = f"{where}.shards[{i}]"
        if not isinstance(entry, dict) or "range" not in entry:
            raise DataFormatError(f"{path}: {swhere} is missing the field 'range'")
        if axis is None:
            if entry["range"] is not None:
                raise DataFormatError(f"{path}: {where} is not split but {swhere}.range is {entry['range']!r}")
            start = stop = 0
        else:
            bounds = _int_list(entry["range"], f"{swhere}.range", path)
            if len(bounds) != 2:
                raise DataFormatError(f"{path}: {swhere}.range must be [start, stop], got {bounds!r}")
            start, stop = bounds
        spec.shards.append(
            ShardSpec(_field(entry, "file", str, swhere, path), _field(entry, "part", int, swhere, path), start, stop)
        )
    _check_coverage(spec, path)
    return spec


def _optional_int(entry: dict, key: str, where: str, path: Path) -> int | None:
    value = entry.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise DataFormatError(f"{path}: {where}.{key} must be a non-negative integer or null, got {value!r}")
    return value


def _parse_flat(spec: TensorSpec, obj: Any, path: Path) -> list[FlatPiece]:
    """Validate a tensor's ``flat`` entry: every part tiled exactly by its pieces, in order."""
    where = f"tensors[{spec.name!r}].flat"
    version = _field(obj, "format", int, where, path)
    if version != FLAT_FORMAT:
        raise DataFormatError(f"{path}: {where}.format is {version}; this megalign reads flat format {FLAT_FORMAT}")
    if not spec.shape:
        raise DataFormatError(f"{path}: {where}: a 0-d tensor cannot be flat-sharded")
    if spec.axis is not None and spec.shape[spec.axis] % spec.parts:
        raise DataFormatError(
            f"{path}: {where}: {spec.parts} parts do not split axis {spec.axis} of shape {list(spec.shape)} evenly"
        )
    pieces = []
    for i, entry in enumerate(_field(obj, "pieces", list, where, path)):
        pwhere = f"{where}.pieces[{i}]"
        bounds = _int_list(_field(entry, "range", list, pwhere, path), f"{pwhere}.range", path)
        if len(bounds) != 2 or bounds[0] >= bounds[1]:
            raise DataFormatError(f"{path}: {pwhere}.range must be [start, stop] with start < stop, got {bounds!r}")
        pieces.append(
            FlatPiece(
                _field(entry, "file", str, pwhere, path),
                _field(entry, "part", int, pwhere, path),
                bounds[0],
                bounds[1],
                _optional_int(entry, "bucket", pwhere, path),
                _optional_int(entry, "offset", pwhere, path),
            )
        )
    numel = math.prod(spec.part_shape())
    for part in range(spec.parts):
        cursor = 0
        for piece in sorted((p for p in pieces if p.part == part), key=lambda p: p.start):
            if piece.start != cursor:
                raise DataFormatError(
                    f"{path}: {where} part {part}: a piece starts at element {piece.start}, expected {cursor} "
                    "(pieces must tile the part without gaps or overlaps)"
                )
            cursor = piece.stop
        if cursor != numel:
            raise DataFormatError(f"{path}: {where} part {part}: pieces cover {cursor} of {numel} elements")
    stray = [p.part for p in pieces if not 0 <= p.part < spec.parts]
    if stray:
        raise DataFormatError(f"{path}: {where} has pieces of part {stray[0]}, expected 0..{spec.parts - 1}")
    return pieces


def _check_buckets(fname: str, info: dict, path: Path) -> None:
    """Validate an optimizer file's bucket layout (``files[fname].buckets``), when present."""
    buckets = info.get("buckets")
    if buckets is None:
        return
    where = f"files[{fname!r}].buckets"
    if not isinstance(buckets, list):
        raise DataFormatError(f"{path}: {where} must be a list")
    for i, bucket in enumerate(buckets):
        bwhere = f"{where}[{i}]"
        if _field(bucket, "index", int, bwhere, path) != i:
            raise DataFormatError(f"{path}: {bwhere}.index must be {i}")
        _field(bucket, "dtype", str, bwhere, path)
        start, stop = _pair(_field(bucket, "range", list, bwhere, path), f"{bwhere}.range", path)
        first, last = _pair(_field(bucket, "shard", list, bwhere, path), f"{bwhere}.shard", path)
        if not start <= first <= last <= stop:
            raise DataFormatError(f"{path}: {bwhere}.shard {[first, last]} lies outside its range {[start, stop]}")


def _pair(value: Any, where: str, path: Path) -> tuple[int, int]:
    bounds = _int_list(value, where, path)
    if len(bounds) != 2 or bounds[0] > bounds[1]:
        raise DataFormatError(f"{path}: {where} must be [start, stop] with start <= stop, got {bounds!r}")
    return bounds[0], bounds[1]


def _check_coverage(spec: TensorSpec, path: Path) -> None:
    """The parts must tile the split axis exactly (replicas of a part may repeat)."""
    where = f"tensors[{spec.name!r}]"
    if not spec.shards:
        raise DataFormatError(f"{path}: {where} lists no shards")
    extent = spec.shape[spec.axis] if spec.axis is not None else 0
    ranges: dict[int, tuple[int, int]] = {}
    for shard in spec.shards:
        if not 0 <= shard.part < spec.parts:
            raise DataFormatError(f"{path}: {where} has part {shard.part}, expected 0..{spec.parts - 1}")
        if ranges.setdefault(shard.part, (shard.start, shard.stop)) != (shard.start, shard.stop):
            raise DataFormatError(f"{path}: {where} part {shard.part} is listed with two different ranges")
    if len(ranges) != spec.parts:
        raise DataFormatError(f"{path}: {where} has {len(ranges)} of {spec.parts} parts")
    cursor = 0
    for part in range(spec.parts):
        start, stop = ranges[part]
        if spec.axis is not None and (start != cursor or stop < start):
            raise DataFormatError(f"{path}: {where} part {part} covers {[start, stop]}, expected to start at {cursor}")
        cursor = stop
    if cursor != extent:
        raise DataFormatError(f"{path}: {where} parts cover {cursor} of {extent} along axis {spec.axis}")


@dataclass
class CheckpointMetadata:
    """Parsed, validated metadata.json."""

    step: int
    consumed_samples: int
    config: dict[str, Any]
    extra: dict[str, Any]
    parallel: dict[str, int]
    files: dict[str, dict[str, Any]]
    tensors: dict[str, TensorSpec]
    raw: dict[str, Any]


def parse_metadata(path: Path) -> CheckpointMetadata:
    """Read and validate metadata.json; raises DataFormatError naming the file and the problem."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: checkpoint metadata is missing (incomplete or not a checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read checkpoint metadata: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataFormatError(f"{path}: not a megalign checkpoint (format field is not {FORMAT_NAME!r})")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise DataFormatError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this megalign reads versions {list(SUPPORTED_FORMAT_VERSIONS)})"
        )
    parallel = _field(raw, "parallel", dict, "metadata", path)
    for key in ("tensor", "pipeline", "data"):
        if _field(parallel, key, int, "parallel", path) < 1:
            raise DataFormatError(f"{path}: parallel.{key} must be >= 1")
    files = _field(raw, "files", dict, "metadata", path)
    for fname, info in files.items():
        if "/" in fname or fname.startswith(".") or not fname.endswith(".safetensors"):
            raise DataFormatError(f"{path}: files lists an invalid file name {fname!r}")
        _field(info, "size", int, f"files[{fname!r}]", path)
        _field(info, "kind", str, f"files[{fname!r}]", path)
        _check_buckets(fname, info, path)
    tensors = {
        name: parse_tensor_spec(name, obj, path) for name, obj in _field(raw, "tensors", dict, "metadata", path).items()
    }
    for spec in tensors.values():
        if spec.flat is not None and version < 2:
            raise DataFormatError(f"{path}: tensor {spec.name!r} is flat-sharded, which needs format version 2")
        for fname in [shard.file for shard in spec.shards] + [piece.file for piece in spec.flat or []]:
            if fname not in files:
                raise DataFormatError(
                    f"{path}: tensor {spec.name!r} is stored in {fname!r}, which is not listed under 'files'"
                )
        for piece in spec.flat or []:
            buckets = files[piece.file].get("buckets")
            if piece.bucket is not None and buckets is not None and piece.bucket >= len(buckets):
                raise DataFormatError(
                    f"{path}: tensor {spec.name!r} has a piece in bucket {piece.bucket} of {piece.file!r}, "
                    f"which lists {len(buckets)} buckets"
                )
    return CheckpointMetadata(
        step=_field(raw, "step", int, "metadata", path),
        consumed_samples=_field(raw, "consumed_samples", int, "metadata", path),
        config=_field(raw, "config", dict, "metadata", path),
        extra=_field(raw, "extra", dict, "metadata", path),
        parallel=dict(parallel),
        files=files,
        tensors=tensors,
        raw=raw,
    )


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header against the file size (detects truncation).

    Returns ``{tensor name: {"dtype", "shape", "data_offsets"}}`` plus ``"__metadata__"`` if present.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DataFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise DataFormatError(
                    f"{path}: safetensors header length {header_len} exceeds the file "
                    f"size {size} (truncated or corrupt file)"
                )
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: checkpoint file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise DataFormatError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    codes = {code: nbytes for code, nbytes in DTYPES.values()}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * codes[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(f"{path}: safetensors entry {name!r} is malformed: {info!r}") from None
        if end > data_size or end - begin != nbytes:
            raise DataFormatError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} of {data_size} "
                "data bytes (truncated or corrupt file)"
            )
    return header


def check_file_against_metadata(directory: Path, fname: str, meta: CheckpointMetadata) -> None:
    """Check that `fname` exists, has its recorded size and holds every listed shard as described."""
    path = directory / fname
    if not path.is_file():
        raise DataFormatError(f"{path}: checkpoint file listed in {METADATA_FILE} is missing")
    expected = meta.files[fname]["size"]
    actual = path.stat().st_size
    if actual != expected:
        raise DataFormatError(
            f"{path}: file is {actual} bytes, {METADATA_FILE} records {expected} (truncated or modified)"
        )
    header = read_safetensors_header(path)
    for spec in meta.tensors.values():
        for piece in spec.flat or []:
            if piece.file != fname:
                continue
            info = header.get(spec.name)
            if info is None or info["dtype"] != DTYPES[spec.dtype][0] or info["shape"] != [piece.stop - piece.start]:
                raise DataFormatError(
                    f"{path}: tensor {spec.name!r} should be a 1-D {spec.dtype} piece of "
                    f"{piece.stop - piece.start} elements (part {piece.part}, flat range "
                    f"{[piece.start, piece.stop]}), found {info!r}"
                )
        for shard in spec.shards:
            if shard.file != fname:
                continue
            info = header.get(spec.name)
            if info is None:
                raise DataFormatError(f"{path}: tensor {spec.name!r} listed in {METADATA_FILE} is missing")
            if info["dtype"] != DTYPES[spec.dtype][0]:
                raise DataFormatError(
                    f"{path}: tensor {spec.name!r} has dtype {info['dtype']}, {METADATA_FILE} says {spec.dtype}"
                )
            if tuple(info["shape"]) != spec.shard_shape(shard):
                raise DataFormatError(
                    f"{path}: tensor {spec.name!r} has shape {info['shape']}, "
                    f"{METADATA_FILE} expects {list(spec.shard_shape(shard))} "
                    f"(global shape {list(spec.shape)}, part {shard.part})"
                )


@dataclass(frozen=True)
class ReadPiece:
    """Read `local` (slices of the stored shard) from `file` and place it at `out` in the result."""

    file: str
    local: tuple[slice, ...]
    out: tuple[slice, ...]


def plan_slice_read(spec: TensorSpec, axis: int | None, start: int, stop: int) -> list[ReadPiece]:
    """Plan reading global ``[start, stop)`` along `axis` (all of it when axis is None) from the shards.

    Works for any split axis and part count, including a request along a different axis than the split.
    """
    box = [(0, n) for n in spec.shape]
    if axis is not None:
        box[axis] = (start, stop)
    return plan_box_read(spec, box)


def plan_box_read(spec: TensorSpec, box: list[tuple[int, int]]) -> list[ReadPiece]:
    """Plan reading the global box ``[start, stop)`` per dim from the shards of a non-flat tensor."""
    ndim = len(spec.shape)
    seen_parts: set[int] = set()
    pieces: list[ReadPiece] = []
    for shard in spec.shards:
        if shard.part in seen_parts:
            continue  # a replica of a part already planned
        seen_parts.add(shard.part)
        offset = [0] * ndim
        have = [(0, n) for n in spec.shape]
        if spec.axis is not None:
            have[spec.axis] = (shard.start, shard.stop)
            offset[spec.axis] = shard.start
        lo_hi = [(max(w[0], h[0]), min(w[1], h[1])) for w, h in zip(box, have)]
        if any(lo >= hi for lo, hi in lo_hi) and ndim > 0:
            continue
        local = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(lo_hi, offset))
        out = tuple(slice(lo - w[0], hi - w[0]) for (lo, hi), w in zip(lo_hi, box))
        pieces.append(ReadPiece(shard.file, local, out))
        if ndim == 0:
            break
    return pieces


@dataclass(frozen=True)
class FlatRead:
    """Assemble a band of rows of one tensor-parallel part from flat pieces, then place part of it.

    ``band_shape``: the band (whole rows of the part); ``pieces``: ``(file, slice of the stored 1-D piece,
    slice of the flattened band)``; ``local``: what to take from the band; ``out``: where it goes.
    """

    band_shape: tuple[int, ...]
    pieces: tuple[tuple[str, slice, slice], ...]
    local: tuple[slice, ...]
    out: tuple[slice, ...]


def plan_flat_read(spec: TensorSpec, box: list[tuple[int, int]]) -> list[FlatRead]:
    """Plan reading the global box of a flat-sharded tensor: per part it touches, only the rows it needs."""
    if spec.flat is None:
        raise ValueError(f"tensor {spec.name!r} is not flat-sharded")
    part_shape = spec.part_shape()
    row = math.prod(part_shape[1:])
    reads = []
    for part in range(spec.parts):
        offset = [0] * len(part_shape)
        if spec.axis is not None:
            offset[spec.axis] = part * part_shape[spec.axis]
        lo_hi = [(max(w[0], o), min(w[1], o + n)) for w, o, n in zip(box, offset, part_shape)]
        if any(lo >= hi for lo, hi in lo_hi):
            continue
        first, last = lo_hi[0][0] - offset[0], lo_hi[0][1] - offset[0]
        begin, end = first * row, last * row
        pieces = tuple(
            (
                p.file,
                slice(max(p.start, begin) - p.start, min(p.stop, end) - p.start),
                slice(max(p.start, begin) - begin, min(p.stop, end) - begin),
            )
            for p in sorted(spec.flat, key=lambda p: p.start)
            if p.part == part and p.start < end and p.stop > begin
        )
        local = (slice(0, last - first),) + tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(lo_hi[1:], offset[1:]))
        out = tuple(slice(lo - w[0], hi - w[0]) for (lo, hi), w in zip(lo_hi, box))
        reads.append(FlatRead((last - first, *part_shape[1:]), pieces, local, out))
    return reads
