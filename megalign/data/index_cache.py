"""On-disk cache of dataset index arrays (.npy), named by a hash of everything that determines them.

An entry is `DIR/{hash}-{kind}-{split}-{name}.npy` for each array plus
`DIR/{hash}-{kind}-{split}-description.json`, where hash is the MD5 of the canonical JSON of the
description (data path, document range, sequence count, token count and a fingerprint of the
sequence lengths, seed, sequence length, sample count, flags). The description is written last, so a
crash mid-write leaves an entry that fails validation rather than one that looks complete.

Loading validates everything it reads: the description must equal the expected one, and every
array its dtype, shape and value range (plus an optional per-array check). A corrupt or mismatched
entry is rebuilt once with a warning; if the rebuilt arrays fail validation too, DataFormatError.

Concurrency: with torch.distributed initialized, rank 0 loads-or-builds first and the other ranks
wait at a barrier; in every case building happens under an fcntl lock on `{entry}.lock`, so
concurrent processes (several ranks on one node, independent jobs) never build the same files twice:
the first builds, the others wait and then load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy

from megalign.errors import ConfigError, DataFormatError
from megalign.utils.atomic import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
ArrayCheck = Callable[[numpy.ndarray], Optional[str]]
EntryCheck = Callable[[Dict[str, numpy.ndarray]], Optional[str]]


@dataclass(frozen=True)
class ArraySpec:
    """What a cached array must look like: dtype, shape, values in [low, high), plus an extra check.

    `check` returns None when the array is fine, else a short description of the problem.
    """

    name: str
    dtype: numpy.dtype
    shape: Tuple[int, ...]
    low: Optional[int] = None
    high: Optional[int] = None
    check: Optional[ArrayCheck] = field(default=None, compare=False)

    def problem(self, array: numpy.ndarray) -> Optional[str]:
        """None when `array` satisfies the spec, else what is wrong."""
        expected = numpy.dtype(self.dtype).newbyteorder("<")
        if array.dtype != expected:
            return f"{self.name} has dtype {array.dtype}, expected {expected}"
        if tuple(array.shape) != tuple(self.shape):
            return f"{self.name} has shape {tuple(array.shape)}, expected {tuple(self.shape)}"
        if array.size and (self.low is not None or self.high is not None):
            low, high = int(array.min()), int(array.max())
            if self.low is not None and low < self.low:
                return f"{self.name} holds {low}, below its minimum {self.low}"
            if self.high is not None and high >= self.high:
                return f"{self.name} holds {high}, not below its bound {self.high}"
        return self.check(array) if self.check is not None else None


def split_description(
    dataset: object,
    dataset_path: str,
    index_split_name: str,
    document_range: Tuple[int, int],
    num_samples: Optional[int],
) -> Dict[str, Any]:
    """The fields every split dataset's description starts with (its class, file, split and size)."""
    return {
        "class": type(dataset).__name__,
        "dataset_path": dataset_path,
        "index_split": index_split_name,
        "document_range": list(document_range),
        "num_samples": num_samples,
    }


def description_hash(description: Dict[str, Any]) -> str:
    """MD5 hex digest of the canonical JSON of `description` (sorted keys, no whitespace)."""
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.md5(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One cached set of arrays: where it lives and what it must contain."""

    directory: str
    kind: str
    split: str
    description: Dict[str, Any]
    specs: Tuple[ArraySpec, ...]
    check: Optional[EntryCheck] = field(default=None, compare=False)

    @property
    def digest(self) -> str:
        """The hash in the file names."""
        return description_hash(self.description)

    @property
    def stem(self) -> str:
        """Path prefix shared by the entry's files."""
        return os.path.join(self.directory, f"{self.digest}-{self.kind}-{self.split}")

    def array_path(self, name: str) -> str:
        """The .npy file of array `name`."""
        return f"{self.stem}-{name}.npy"

    @property
    def description_path(self) -> str:
        """The JSON description, written last."""
        return f"{self.stem}-description.json"

    @property
    def lock_path(self) -> str:
        """The fcntl lock file guarding builds of this entry."""
        return f"{self.stem}.lock"

    def exists(self) -> bool:
        """Whether any file of the entry is present (complete or not)."""
        return os.path.exists(self.description_path) or any(os.path.exists(self.array_path(s.name)) for s in self.specs)

    def stored_description(self) -> Dict[str, Any]:
        """The description with the cache format version, as written to disk."""
        return {"cache_format_version": CACHE_FORMAT_VERSION, **self.description}


def validate_arrays(
    specs: Sequence[ArraySpec], arrays: Dict[str, numpy.ndarray], check: Optional[EntryCheck] = None
) -> Optional[str]:
    """None when every array meets its spec and `check` (across arrays) passes, else the first problem."""
    for spec in specs:
        if spec.name not in arrays:
            return f"{spec.name} is missing"
        problem = spec.problem(arrays[spec.name])
        if problem is not None:
            return problem
    return check(arrays) if check is not None else None


def _validate(entry: CacheEntry, arrays: Dict[str, numpy.ndarray]) -> Optional[str]:
    return validate_arrays(entry.specs, arrays, entry.check)


def _load(entry: CacheEntry) -> Tuple[Optional[Dict[str, numpy.ndarray]], Optional[str]]:
    """(arrays, None) on a valid hit, (None, problem) otherwise; problem is None when nothing is cached."""
    if not entry.exists():
        return None, None
    try:
        with open(entry.description_path, "r", encoding="utf-8") as handle:
            stored = json.load(handle)
    except FileNotFoundError:
        return None, f"{entry.description_path} is missing (an interrupted build?)"
    except (OSError, ValueError) as error:
        return None, f"{entry.description_path} is unreadable: {error}"
    if stored != entry.stored_description():
        return None, f"{entry.description_path} does not match the dataset and settings it is named for"
    arrays: Dict[str, numpy.ndarray] = {}
    for spec in entry.specs:
        path = entry.array_path(spec.name)
        try:
            arrays[spec.name] = numpy.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            return None, f"{path} is unreadable: {error}"
    problem = _validate(entry, arrays)
    return (None, f"{entry.stem}: {problem}") if problem else (arrays, None)


def _write(entry: CacheEntry, arrays: Dict[str, numpy.ndarray]) -> None:
    """Write every array atomically, then the description (whose presence completes the entry)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(entry.description_path)
    for spec in entry.specs:
        with atomic_write(entry.array_path(spec.name), "wb") as handle:
            numpy.save(handle, numpy.ascontiguousarray(arrays[spec.name]), allow_pickle=False)
    write_json_atomic(entry.description_path, entry.stored_description())


def _distributed_rank() -> Optional[int]:
    """This process's rank when torch.distributed is initialized with more than one process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


class IndexCache:
    """Loads index arrays from a cache directory, building and writing them on a miss.

    `synchronize` (default True) makes ranks of an initialized torch.distributed job take turns:
    rank 0 first, then a barrier, then the others -- so every rank must call load_or_build for the
    same entries in the same order (the dataset builders do). Pass False when only some ranks build
    datasets; the file lock alone still prevents duplicate builds.
    """

    def __init__(self, directory: str, synchronize: bool = True) -> None:
        self.directory = os.path.abspath(str(directory))
        self.synchronize = synchronize

    def entry(
        self,
        kind: str,
        split: str,
        description: Dict[str, Any],
        specs: Sequence[ArraySpec],
        check: Optional[EntryCheck] = None,
    ) -> CacheEntry:
        """A CacheEntry in this cache's directory; `check` validates the arrays together."""
        return CacheEntry(self.directory, kind, split, dict(description), tuple(specs), check)

    def load_or_build(
        self, entry: CacheEntry, build: Callable[[], Dict[str, numpy.ndarray]]
    ) -> Dict[str, numpy.ndarray]:
        """The entry's arrays: loaded (memory-mapped) when a valid copy exists, else built and written."""
        rank = _distributed_rank() if self.synchronize else None
        if rank is None:
            return self._load_or_build(entry, build)
        import torch.distributed as dist

        arrays = self._load_or_build(entry, build) if rank == 0 else None
        dist.barrier()
        return arrays if arrays is not None else self._load_or_build(entry, build)

    def _load_or_build(
        self, entry: CacheEntry, build: Callable[[], Dict[str, numpy.ndarray]]
    ) -> Dict[str, numpy.ndarray]:
        arrays, problem = _load(entry)
        if arrays is not None:
            logger.info("loaded %s %s indices from %s", entry.kind, entry.split, entry.stem)
            return arrays
        try:
            os.makedirs(self.directory, exist_ok=True)
            lock_file = open(entry.lock_path, "a+b")  # noqa: SIM115 - closed by the with below
        except OSError as error:
            raise ConfigError(
                f"path_to_cache: cannot use {self.directory} for the dataset index cache ({error}); "
                "point --data-cache-path (path_to_cache) at a writable directory"
            ) from error
        with lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)  # released when the file closes
            arrays, problem = _load(entry)  # another process may have built it while we waited
            if arrays is not None:
                return arrays
            if problem is not None:
                logger.warning("rebuilding %s %s indices: %s", entry.kind, entry.split, problem)
            return self._build_and_write(entry, build)

    def _build_and_write(
        self, entry: CacheEntry, build: Callable[[], Dict[str, numpy.ndarray]]
    ) -> Dict[str, numpy.ndarray]:
        start = time.monotonic()
        arrays = build()
        problem = _validate(entry, arrays)
        if problem is not None:
            raise DataFormatError(
                f"{entry.stem}: freshly built {entry.kind} {entry.split} indices are invalid ({problem}); "
                "the dataset files may have changed while building or are inconsistent: re-run preprocessing"
            )
        try:
            _write(entry, arrays)
        except OSError as error:
            raise ConfigError(
                f"path_to_cache: cannot write the dataset index cache {entry.stem}-* ({error}); "
                "point --data-cache-path (path_to_cache) at a writable directory with free space"
            ) from error
        logger.info(
            "built %s %s indices in %.2f s: %s",
            entry.kind,
            entry.split,
            time.monotonic() - start,
            ", ".join(f"{name} {array.shape}" for name, array in arrays.items()),
        )
        return arrays
