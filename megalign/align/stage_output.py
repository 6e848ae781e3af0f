"""The output of one shard of an alignment stage, written so that every input record ends exactly once.

Layout of a stage's output directory (shard ``i`` of ``n``; ``P = part-0000i-of-0000n``)::

    P.jsonl.partial     records finished so far, one JSON line each (the shard is running or was killed)
    P.jsonl             the same file renamed when the shard finished (what the next stage reads)
    P.settings.json     the settings the shard runs with (a rerun with other settings is refused)
    P.summary.json      counts by status and the stage's summary, written when the shard finished
    manifest.json       the stage, its shards, which are finished and which are missing

The output file is its own journal: a record is done exactly when its line is in the file. Each line is
written with a single ``write`` and flushed, so a crash (even SIGKILL) loses at most the line being written;
on restart a torn last line is cut off and the records already there are skipped. The file is fsynced
every few seconds and when the shard finishes, so a power loss also loses only the last seconds of work.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Union

from megalign.align.records import MANIFEST_FILE, Record, check_shard_flags
from megalign.errors import ConfigError, DataFormatError
from megalign.utils.atomic import write_json_atomic

__all__ = ["ShardOutput", "part_name", "read_manifest"]

PathLike = Union[str, Path]
_FSYNC_SECONDS = 5.0
_PART_RE = re.compile(r"^part-(\d+)-of-(\d+)\.")


def part_name(shard_index: int, num_shards: int) -> str:
    """The base name of shard ``shard_index`` of ``num_shards``."""
    return f"part-{shard_index:05d}-of-{num_shards:05d}"


def read_manifest(directory: PathLike) -> Dict[str, Any]:
    """The ``manifest.json`` of a stage output directory (DataFormatError naming it when unreadable)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot read the stage manifest: {exc}") from None


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} then {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


class ShardOutput:
    """Exactly-once, resumable output of one shard (see the module docstring). Thread-safe ``write``.

    ``settings``: everything that determines the output (JSON values); a rerun must pass the same. Use as
    a context manager or call :meth:`open`, then :meth:`is_done` / :meth:`write` per record and
    :meth:`finish` at the end (an exception leaves the ``.partial`` file for the next run to resume).
    """

    def __init__(
        self,
        directory: PathLike,
        stage: str,
        shard_index: int = 0,
        num_shards: int = 1,
        settings: Optional[Mapping[str, Any]] = None,
    ) -> None:
        check_shard_flags(shard_index, num_shards)
        self.directory, self.stage = Path(directory), stage
        self.shard_index, self.num_shards = shard_index, num_shards
        self.settings = dict(settings or {})
        base = part_name(shard_index, num_shards)
        self.final_path = self.directory / f"{base}.jsonl"
        self.partial_path = self.directory / f"{base}.jsonl.partial"
        self.settings_path = self.directory / f"{base}.settings.json"
        self.summary_path = self.directory / f"{base}.summary.json"
        self.done_ids: Set[str] = set()
        self.statuses: Dict[str, int] = {}
        self.resumed = 0
        self.already_finished = False
        self._handle: Optional[Any] = None
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()

    # ---- opening ---------------------------------------------------------------------------------------
    def open(self) -> "ShardOutput":
        """Create the directory, check the settings and shard count, and recover the records already written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_layout()
        self._check_settings()
        self.update_manifest()
        if self.final_path.exists():
            self.already_finished = True
            self._scan(self.final_path, truncate=False)
            return self
        if self.partial_path.exists():
            self._scan(self.partial_path, truncate=True)
            self.resumed = len(self.done_ids)
        self._handle = open(self.partial_path, "ab")
        return self

    def __enter__(self) -> "ShardOutput":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_layout(self) -> None:
        manifest_path = self.directory / MANIFEST_FILE
        if manifest_path.exists():
            manifest = read_manifest(self.directory)
            if manifest.get("stage") != self.stage or manifest.get("num_shards") != self.num_shards:
                raise ConfigError(
                    f"--output {self.directory}: holds the output of stage {manifest.get('stage')!r} "
                    f"with {manifest.get('num_shards')} shards; this run is stage {self.stage!r} with "
                    f"--num-shards {self.num_shards}: choose a new --output directory"
                )
        others = sorted(
            p.name
            for p in self.directory.glob("part-*")
            if (m := _PART_RE.match(p.name)) and int(m.group(2)) != self.num_shards
        )
        if others:
            raise ConfigError(
                f"--output {self.directory}: holds {others[0]}, written with another --num-shards; "
                "choose a new --output directory"
            )

    def _check_settings(self) -> None:
        settings = json.loads(json.dumps(self.settings))  # as it reads back (tuples become lists)
        if self.settings_path.exists():
            try:
                old = json.loads(self.settings_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DataFormatError(f"{self.settings_path}: cannot read: {exc}") from None
            changed = _differences(old, settings)
            if changed:
                raise ConfigError(
                    f"{self.settings_path}: this shard was started with other settings "
                    f"({'; '.join(changed[:4])}); rerun with the same settings to resume, or choose "
                    "a new --output directory"
                )
        else:
            write_json_atomic(self.settings_path, settings)

    def _scan(self, path: Path, truncate: bool) -> None:
        """Read the ids (and statuses) already written; cut a torn last line off a partial file."""
        good_end = 0
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    if not truncate:
                        raise DataFormatError(f"{path}:{line_number}: the last line is incomplete")
                    break  # a line torn by a crash: it is rewritten
                try:
                    record = json.loads(raw)
                    rid = record["id"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataFormatError(
                        f"{path}:{line_number}: not a record this stage wrote ({exc}); the output "
                        "directory was modified: restore it or choose a new --output"
                    ) from None
                if rid in self.done_ids:
                    raise DataFormatError(
                        f"{path}:{line_number}: id {rid!r} is written twice; the output directory "
                        "was modified: restore it or choose a new --output"
                    )
                self.done_ids.add(rid)
                status = record.get("status")
                if isinstance(status, str):
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                good_end += len(raw)
        if truncate and path.stat().st_size != good_end:
            with open(path, "r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())

    # ---- writing ---------------------------------------------------------------------------------------
    def is_done(self, rid: str) -> bool:
        """Whether record ``rid`` is already in the output (from this run or an earlier one)."""
        return rid in self.done_ids

    def write(self, record: Record) -> None:
        """Append a finished record (it must carry its ``id``); an id written before raises RuntimeError."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._handle is None:
                raise RuntimeError(f"{self.partial_path}: not open for writing")
            rid = record["id"]
            if rid in self.done_ids:
                raise RuntimeError(f"record {rid!r} written twice to {self.partial_path}")
            self._handle.write(line)
            self._handle.flush()
            self.done_ids.add(rid)
            status = record.get("status")
            if isinstance(status, str):
                self.statuses[status] = self.statuses.get(status, 0) + 1
            now = time.monotonic()
            if now - self._last_sync > _FSYNC_SECONDS:
                os.fsync(self._handle.fileno())
                self._last_sync = now

    def finish(self, summary: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Make the shard's file durable and final, write its summary and update ``manifest.json``."""
        with self._lock:
            if self._close_handle():
                os.replace(self.partial_path, self.final_path)
        record = {
            "stage": self.stage,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "file": self.final_path.name,
            "records": len(self.done_ids),
            "statuses": dict(self.statuses),
            "finished_at": time.time(),
            "summary": dict(summary or {}),
        }
        if not self.already_finished or not self.summary_path.exists():
            write_json_atomic(self.summary_path, record)
        self.update_manifest()
        return record

    def close(self) -> None:
        """Flush and close without finishing (the ``.partial`` file stays for a rerun)."""
        with self._lock:
            self._close_handle()

    def _close_handle(self) -> bool:
        """Flush, fsync and close the open file (the caller holds the lock); False when none was open."""
        if self._handle is None:
            return False
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        return True

    def update_manifest(self) -> None:
        """Rebuild ``manifest.json`` from the shard summaries present (under a lock: shards finish concurrently)."""
        lock_path = self.directory / ".manifest.lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                shards: Dict[str, Any] = {}
                for index in range(self.num_shards):
                    path = self.directory / f"{part_name(index, self.num_shards)}.summary.json"
                    if path.exists():
                        shards[str(index)] = json.loads(path.read_text(encoding="utf-8"))
                missing = [i for i in range(self.num_shards) if str(i) not in shards]
                statuses: Dict[str, int] = {}
                for shard in shards.values():
                    for status, count in shard.get("statuses", {}).items():
                        statuses[status] = statuses.get(status, 0) + count
                write_json_atomic(
                    self.directory / MANIFEST_FILE,
                    {
                        "stage": self.stage,
                        "num_shards": self.num_shards,
                        "settings": self.settings,
                        "finished_shards": sorted(int(i) for i in shards),
                        "missing_shards": missing,
                        "records": sum(s.get("records", 0) for s in shards.values()),
                        "statuses": statuses,
                        "files": [s["file"] for _, s in sorted(shards.items(), key=lambda kv: int(kv[0]))],
                        "shards": shards,
                    },
                )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
