"""Reading the records of an alignment stage: JSONL shards (plain, .gz, .zst), ids, and shard selection.

Every record is a JSON object with a ``text`` string and a stable ``id``: the record's own ``id`` (a string
or an integer, used as a string) or, when it has none, a hash of its text (:func:`text_id`). A stage's
input is any mix of files, globs and directories; a directory that another stage wrote (it holds a
``manifest.json``) must be complete, so that a downstream stage never reads a half-written corpus.

Sharding (``--shard-index i --num-shards n``): input records are numbered 0, 1, 2, ... in file order (files
sorted by path) and record ``k`` belongs to shard ``k % n``, so the shards are balanced and every record
belongs to exactly one of them whatever the file sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Sequence

from megalign.data.jsonl import (
    BadRecordStats,
    RecordProblem,
    bad_record_error,
    count_lines,
    expand_inputs,
    is_blank,
    iter_lines,
    parse_record,
)
from megalign.errors import BadRecordError, ConfigError, DataFormatError

__all__ = ["MANIFEST_FILE", "Record", "StageInput", "check_shard_flags", "record_id", "text_id"]

MANIFEST_FILE = "manifest.json"
Record = Dict[str, Any]


def text_id(text: str) -> str:
    """The id of a record that has none: the first 20 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def record_id(record: Record, where: str) -> str:
    """The record's id as a string (its ``id`` field, or :func:`text_id`); BadRecordError for a bad ``id``."""
    value = record.get("id")
    if value is None:
        return text_id(record["text"])
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BadRecordError(f"{where}: field 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def check_shard_flags(shard_index: int, num_shards: int) -> None:
    """ConfigError unless ``0 <= shard_index < num_shards``."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"--num-shards {num_shards!r} must be a positive integer")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise ConfigError(
            f"--shard-index {shard_index!r} must be in [0, {num_shards - 1}] for --num-shards {num_shards}"
        )


def _check_stage_directory(directory: str) -> None:
    """A directory written by a stage must be complete (every shard finished) before it is read."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        missing = manifest["missing_shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(
            f"{path}: cannot read the stage manifest ({exc}); rerun the stage that wrote {directory}"
        ) from None
    if missing:
        listed = ", ".join(str(i) for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise DataFormatError(
            f"{directory}: stage {manifest.get('stage')!r} has not finished shards {listed} of "
            f"{manifest.get('num_shards')}; run them (or rerun the stage) before reading it"
        )


@dataclass
class StageInput:
    """The records of one shard of a stage's input, in file order, each with a string ``id``.

    ``duplicate_ids``: "error" (default) raises BadRecordError naming both places when an id repeats within
    the shard; "keep" yields them (dedup, which removes exact duplicates, uses it).
    """

    patterns: Sequence[str]
    shard_index: int = 0
    num_shards: int = 1
    skip_bad_records: bool = False
    duplicate_ids: str = "error"
    stats: BadRecordStats = field(default_factory=BadRecordStats)

    def __post_init__(self) -> None:
        check_shard_flags(self.shard_index, self.num_shards)
        if self.duplicate_ids not in ("error", "keep"):
            raise ValueError(f"duplicate_ids must be 'error' or 'keep', not {self.duplicate_ids!r}")
        for pattern in self.patterns:
            if os.path.isdir(pattern):
                _check_stage_directory(pattern)
        self.files: List[str] = expand_inputs(list(self.patterns))

    def count(self) -> int:
        """About the number of records of this shard (from line counts; blank lines count), for progress totals."""
        total = sum(count_lines(path) for path in self.files)
        return len(range(self.shard_index, total, self.num_shards))

    def __iter__(self) -> Iterator[Record]:
        seen: Dict[str, str] = {}
        ordinal = -1
        for path in self.files:
            for line_number, raw in iter_lines(path):
                if is_blank(raw):
                    continue
                ordinal += 1
                if ordinal % self.num_shards != self.shard_index:
                    continue  # another shard's record: not even parsed
                where = f"{path}:{line_number}"
                try:
                    record = parse_record(raw, ("text",))
                    rid = record_id(record, where)
                except (RecordProblem, BadRecordError) as problem:
                    if not self.skip_bad_records:
                        if isinstance(problem, RecordProblem):
                            raise bad_record_error(path, line_number, problem) from None
                        raise
                    reason = problem.reason if isinstance(problem, RecordProblem) else "bad_id"
                    self.stats.add(reason, where, str(problem)[:120])
                    continue
                if self.duplicate_ids == "error":
                    first = seen.setdefault(rid, where)
                    if first != where:
                        raise BadRecordError(
                            f"{where}: id {rid!r} repeats the record at {first}; ids must be "
                            "unique (run `megalign align dedup` first, or fix the ids)"
                        )
                record["id"] = rid
                yield record
