"""Atomic writes: a crash never leaves a file that looks complete but is not.

Every writer in megalign writes to a temporary sibling and renames it into place with os.replace,
which is atomic on POSIX file systems when source and target are in the same directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def temporary_sibling(path: PathLike) -> str:
    """Return a unique temporary path in the same directory as `path` (same file system)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return tmp


def commit(tmp_path: PathLike, final_path: PathLike) -> None:
    """fsync `tmp_path` and atomically move it to `final_path`."""
    with open(tmp_path, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_path, final_path)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    tmp = temporary_sibling(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path: PathLike, payload: Any) -> None:
    """Write `payload` as pretty-printed UTF-8 JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=2, sort_keys=True)
        handle.write("\n")


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames and new entries in it are durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def install_directory(tmp: PathLike, final: PathLike) -> None:
    """Rename the finished temporary directory ``tmp`` to ``final``, replacing an older ``final`` only after
    it has been moved aside (so ``final`` is at every moment either the old or the new complete directory)."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
