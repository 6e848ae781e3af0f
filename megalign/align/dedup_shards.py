"""The per-shard sketch files of ``megalign align dedup``: written by each shard, read by the global finalise.

Shard ``i`` of ``n`` writes ``OUTPUT/signatures/part-0000i-of-0000n/``::

    ordinals.npy        int64 (N,)      each record's number in the whole input (the input order)
    exact.npy           uint64 (N, 2)   128-bit hash of each record's normalised text (exact duplicates)
    bands.npy           uint64 (N, B)   LSH band hashes
    signatures-K.npy    uint32 (<=C, P) MinHash signatures, in chunks (memory-mapped by the finalise)
    ids.json            the records' ids, in the same order
    meta.json           format version, settings, record count, chunk sizes, bad-record counts

The directory is assembled under a temporary name and renamed into place when complete, so a finished
shard is exactly a directory with that name; a killed shard leaves only a temporary directory that the
next run removes. Everything is .npy read with ``allow_pickle=False`` or JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from megalign.align.stage_output import part_name
from megalign.errors import ConfigError, DataFormatError
from megalign.utils.atomic import install_directory, write_json_atomic

__all__ = [
    "FORMAT_VERSION",
    "SIGNATURES_DIR",
    "SignatureShards",
    "SignatureShardWriter",
    "check_settings",
    "load_signature_shards",
    "read_shard_meta",
]

SIGNATURES_DIR = "signatures"
FORMAT_VERSION = 1
_CHUNK_ROWS = 16384


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} then {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def read_shard_meta(root: Path, shard_index: int, num_shards: int) -> Optional[Dict[str, Any]]:
    """The ``meta.json`` of a finished shard directory, or None when the shard has not finished."""
    path = Path(root) / part_name(shard_index, num_shards) / "meta.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot read ({exc}); delete {path.parent} and rerun that shard") from None


def check_settings(meta: Mapping[str, Any], settings: Mapping[str, Any], where: Path) -> None:
    """ConfigError naming the differences when a shard was sketched with other settings."""
    changed = _differences(meta.get("settings", {}), json.loads(json.dumps(dict(settings))))
    if changed:
        raise ConfigError(
            f"{where}: these signatures were computed with other settings ({'; '.join(changed[:4])}); "
            "rerun with the same flags, or choose a new --output directory"
        )


class SignatureShardWriter:
    """Collects one shard's sketches and commits them as one directory (see the module docstring)."""

    def __init__(
        self, root: Path, shard_index: int, num_shards: int, settings: Mapping[str, Any], chunk_rows: int = _CHUNK_ROWS
    ) -> None:
        self.root = Path(root)
        self.final_dir = self.root / part_name(shard_index, num_shards)
        self.tmp_dir = self.root / f".{self.final_dir.name}.tmp-{os.getpid()}"
        self.settings = json.loads(json.dumps(dict(settings)))
        self.chunk_rows = chunk_rows
        self.ids: List[str] = []
        self._ordinals: List[np.ndarray] = []
        self._exact: List[np.ndarray] = []
        self._bands: List[np.ndarray] = []
        self._pending: List[np.ndarray] = []
        self._pending_rows = 0
        self._chunk_sizes: List[int] = []
        for stale in self.root.glob(f".{self.final_dir.name}.tmp-*"):  # left by a killed run of this shard
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)

    def add(
        self, ids: Sequence[str], ordinals: np.ndarray, exact: np.ndarray, signatures: np.ndarray, bands: np.ndarray
    ) -> None:
        """Append a batch of records' sketches (all arrays have one row per id)."""
        self.ids.extend(ids)
        self._ordinals.append(np.asarray(ordinals, dtype=np.int64))
        self._exact.append(np.asarray(exact, dtype=np.uint64))
        self._bands.append(np.asarray(bands, dtype=np.uint64))
        self._pending.append(np.asarray(signatures, dtype=np.uint32))
        self._pending_rows += len(ids)
        if self._pending_rows >= self.chunk_rows:
            self._flush_signatures()

    def _flush_signatures(self) -> None:
        if not self._pending_rows:
            return
        chunk = np.concatenate(self._pending)
        np.save(self.tmp_dir / f"signatures-{len(self._chunk_sizes):05d}.npy", chunk, allow_pickle=False)
        self._chunk_sizes.append(len(chunk))
        self._pending, self._pending_rows = [], 0

    def finish(self, num_perm: int, num_bands: int, extra: Mapping[str, Any]) -> Dict[str, Any]:
        """Write the remaining files and rename the directory into place; returns the meta record."""
        self._flush_signatures()
        arrays = {
            "ordinals": (self._ordinals, (0,), np.int64),
            "exact": (self._exact, (0, 2), np.uint64),
            "bands": (self._bands, (0, num_bands), np.uint64),
        }
        for name, (parts, empty_shape, dtype) in arrays.items():
            value = np.concatenate(parts) if parts else np.empty(empty_shape, dtype=dtype)
            np.save(self.tmp_dir / f"{name}.npy", value, allow_pickle=False)
        (self.tmp_dir / "ids.json").write_text(json.dumps(self.ids, ensure_ascii=False), encoding="utf-8")
        meta = {
            "format_version": FORMAT_VERSION,
            "settings": self.settings,
            "records": len(self.ids),
            "num_perm": num_perm,
            "num_bands": num_bands,
            "signature_chunks": self._chunk_sizes,
            **extra,
        }
        write_json_atomic(self.tmp_dir / "meta.json", meta)
        for path in self.tmp_dir.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        install_directory(self.tmp_dir, self.final_dir)
        return meta

    def abort(self) -> None:
        """Remove the temporary directory (the shard did not finish)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


@dataclass
class SignatureShards:
    """All shards' sketches, concatenated in shard order (row ``r``); signatures stay memory-mapped on disk."""

    ids: List[str]
    ordinals: np.ndarray
    exact: np.ndarray
    bands: np.ndarray
    shard_starts: np.ndarray  # row where each shard begins, plus the total
    metas: List[Dict[str, Any]]
    chunks: List[np.ndarray] = field(default_factory=list)
    chunk_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    def signature_rows(self, rows: np.ndarray) -> np.ndarray:
        """The signatures of the given rows (any order, repeats allowed), read from the memory-mapped chunks."""
        rows = np.asarray(rows, dtype=np.int64)
        width = self.chunks[0].shape[1] if self.chunks else 0
        out = np.empty((len(rows), width), dtype=np.uint32)
        which = np.searchsorted(self.chunk_starts, rows, side="right") - 1
        for chunk in np.unique(which):
            at = np.flatnonzero(which == chunk)
            out[at] = self.chunks[chunk][rows[at] - self.chunk_starts[chunk]]
        return out


def _load_array(path: Path, dtype: Any, shape: Sequence[Optional[int]], mmap: bool = False) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as exc:
        raise DataFormatError(f"{path}: cannot read ({exc}); delete {path.parent} and rerun that shard") from None
    if (
        value.dtype != np.dtype(dtype)
        or value.ndim != len(shape)
        or any(want is not None and got != want for got, want in zip(value.shape, shape))
    ):
        raise DataFormatError(
            f"{path}: holds {value.dtype} {value.shape}, expected {np.dtype(dtype)} "
            f"{tuple('N' if s is None else s for s in shape)}; delete {path.parent} and rerun "
            "that shard"
        )
    return value


def load_signature_shards(
    root: Path, num_shards: int, settings: Mapping[str, Any], num_perm: int, num_bands: int, shard_command: str = ""
) -> SignatureShards:
    """Read all ``num_shards`` shards under ``root``; errors name missing, stale or malformed shards."""
    root = Path(root)
    metas = [read_shard_meta(root, i, num_shards) for i in range(num_shards)]
    missing = [i for i, meta in enumerate(metas) if meta is None]
    if missing:
        listed = ", ".join(str(i) for i in missing[:16]) + (" ..." if len(missing) > 16 else "")
        hint = f" ({shard_command})" if shard_command else ""
        raise DataFormatError(
            f"{root}: the signatures of shard(s) {listed} of {num_shards} are missing; run "
            f"those shards with --shard-index I --num-shards {num_shards}{hint}, then finalise"
        )
    ids: List[str] = []
    ordinals, exact, bands, chunks = [], [], [], []
    shard_starts, chunk_starts = [0], [0]
    for index, meta in enumerate(metas):
        directory = root / part_name(index, num_shards)
        assert meta is not None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataFormatError(
                f"{directory}: format version {meta.get('format_version')!r}, expected "
                f"{FORMAT_VERSION}; delete it and rerun that shard"
            )
        check_settings(meta, settings, directory)
        count = int(meta["records"])
        try:
            shard_ids = json.loads((directory / "ids.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataFormatError(
                f"{directory / 'ids.json'}: cannot read ({exc}); delete {directory} and rerun that shard"
            ) from None
        if not isinstance(shard_ids, list) or len(shard_ids) != count:
            raise DataFormatError(f"{directory / 'ids.json'}: expected a list of {count} ids")
        ids.extend(shard_ids)
        ordinals.append(_load_array(directory / "ordinals.npy", np.int64, (count,)))
        exact.append(_load_array(directory / "exact.npy", np.uint64, (count, 2)))
        bands.append(_load_array(directory / "bands.npy", np.uint64, (count, num_bands)))
        for k, size in enumerate(meta["signature_chunks"]):
            chunk = _load_array(directory / f"signatures-{k:05d}.npy", np.uint32, (size, num_perm), mmap=True)
            chunks.append(chunk)
            chunk_starts.append(chunk_starts[-1] + size)
        if chunk_starts[-1] != shard_starts[-1] + count:
            raise DataFormatError(
                f"{directory}: signature chunks hold {chunk_starts[-1] - shard_starts[-1]} rows, "
                f"meta.json says {count}; delete it and rerun that shard"
            )
        shard_starts.append(shard_starts[-1] + count)
    return SignatureShards(
        ids=ids,
        ordinals=np.concatenate(ordinals),
        exact=np.concatenate(exact),
        bands=np.concatenate(bands),
        shard_starts=np.asarray(shard_starts, dtype=np.int64),
        metas=[m for m in metas if m is not None],
        chunks=chunks,
        chunk_starts=np.asarray(chunk_starts, dtype=np.int64),
    )
