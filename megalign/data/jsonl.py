"""Reading JSONL corpora: input globs, plain/gzip/zstd files, records validated line by line.

Every stage that reads JSONL (preprocess, the alignment stages) goes through this module, so a bad
line gets the same answer everywhere: a BadRecordError "FILE:LINE: what is wrong (key 'text')", or,
when the caller skips bad records, a count by reason in a BadRecordStats.

    for line_number, record in iter_records("corpus.jsonl.zst", json_keys=("text",)):
        ...

Lines are decoded one at a time (strict UTF-8), so an invalid byte is reported at its own line.
Blank lines are skipped silently but still counted, so line numbers match what an editor shows.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Dict, Iterator, List, Optional, Sequence, Set, TextIO, Tuple, Type, cast

from megalign.errors import BadRecordError, DataFormatError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: File name endings recognised as JSONL inputs (a directory given as input expands to these).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")

#: Why a record was rejected; the keys of BadRecordStats.counts.
BAD_RECORD_REASONS = ("invalid_utf8", "malformed_json", "not_an_object", "missing_key", "non_string_value")

_UTF8_BOM = b"\xef\xbb\xbf"
_MAX_EXAMPLES = 5
_COUNT_BLOCK = 1 << 22


def compression_of(path: str) -> Optional[str]:
    """'gzip', 'zstd' or None (plain), from the file name."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return "gzip"
    if lower.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand files, directories and glob patterns into a sorted list of distinct input files.

    A directory stands for the JSONL files directly inside it (see JSONL_SUFFIXES). A pattern or
    directory that matches no file raises DataFormatError naming it.
    """
    if not patterns:
        raise DataFormatError("no input given: pass at least one JSONL file or glob pattern")
    found: Set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = [
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if name.lower().endswith(JSONL_SUFFIXES) and os.path.isfile(os.path.join(pattern, name))
            ]
            if not matches:
                raise DataFormatError(
                    f"input directory '{pattern}' holds no JSONL files (looked for {', '.join(JSONL_SUFFIXES)})"
                )
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]
            if not matches:
                raise DataFormatError(
                    f"input '{pattern}' matches no file: check the path, or quote the glob so that the "
                    "shell does not expand it"
                )
        found.update(os.path.normpath(path) for path in matches)
    return sorted(found)


def open_binary(path: str) -> BinaryIO:
    """Open a plain, gzip (.gz) or zstandard (.zst/.zstd) file for buffered binary reading."""
    try:
        source = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: is a directory, expected a JSONL file") from None
    except OSError as error:
        raise DataFormatError(f"{path}: cannot open ({error.strerror or error})") from None
    if compression_of(path) is None:
        return source
    return decompressing_reader(source, path, close_source=True)


def decompressing_reader(source: BinaryIO, path: str, close_source: bool = False) -> BinaryIO:
    """Wrap an open binary file in the decompressor its name asks for (plain files: `source` itself).

    With close_source=False the caller keeps `source` open and can follow its position (how much
    of the file on disk has been consumed), e.g. for progress reports.
    """
    kind = compression_of(path)
    if kind == "gzip":
        reader = gzip.GzipFile(filename=path, mode="rb", fileobj=source)
        if close_source:
            # GzipFile closes `myfileobj` on close(); typeshed declares it a FileIO, but any binary file will do.
            reader.myfileobj = source  # type: ignore[assignment]
        return cast(BinaryIO, reader)  # a GzipFile is a binary file (typeshed does not derive it from BinaryIO)
    if kind == "zstd":
        return io.BufferedReader(_ZstdReader(source, close_source), buffer_size=1 << 20)
    return source


class _ZstdReader(io.RawIOBase):
    """Raw reader of a (multi-frame) zstandard stream that raises on a truncated last frame.

    zstandard's own stream_reader ends silently at a truncated frame; a corpus cut short must not
    pass for a complete one.
    """

    _CHUNK = 1 << 20

    def __init__(self, source: BinaryIO, close_source: bool) -> None:
        import zstandard

        self._zstd = zstandard
        self._file = source
        self._close_source = close_source
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""  # decompressed bytes not yet returned, from self._offset on
        self._offset = 0
        self._frame_open = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:  # (an empty feed happens mid-frame: read on)
            compressed = self._file.read(self._CHUNK)
            if not compressed:
                if self._frame_open:
                    raise EOFError("zstd stream ends inside a frame")
                return 0
            self._pending = self._feed(compressed)
        view = memoryview(buffer)  # BufferedReader passes a memoryview of bytes already
        count = min(len(view), len(self._pending) - self._offset)
        view[:count] = self._pending[self._offset : self._offset + count]
        self._offset += count
        if self._offset == len(self._pending):
            self._pending, self._offset = b"", 0
        return count

    def _feed(self, compressed: bytes) -> bytes:
        output = []
        while compressed:
            self._frame_open = True
            output.append(self._decompressor.decompress(compressed))
            if not self._decompressor.eof:
                break
            self._frame_open = False
            compressed = self._decompressor.unused_data
            self._decompressor = self._zstd.ZstdDecompressor().decompressobj()
        return b"".join(output)

    def close(self) -> None:
        if not self.closed and self._close_source:
            self._file.close()
        super().close()


def open_text(path: str) -> TextIO:
    """Open a plain, .gz or .zst/.zstd file as strict UTF-8 text (lines end at '\\n' only)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="strict", newline="\n")


def iter_lines(path: str, source: Optional[BinaryIO] = None) -> Iterator[Tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes of the line) for every line of a (compressed) file.

    `source`, when given, is the file already opened in binary mode (the caller closes it, and may
    follow its position). A corrupt or truncated compressed stream raises DataFormatError naming
    the file and the last good line.
    """
    line_number = 0
    try:
        handle = open_binary(path) if source is None else decompressing_reader(source, path)
        with handle:
            for line_number, raw in enumerate(handle, start=1):
                yield line_number, raw
    except _STREAM_ERRORS as error:
        raise _corrupt_stream(path, line_number, error) from None


def count_lines(path: str) -> int:
    """Number of lines of a (compressed) file, as iter_lines yields them, without parsing them."""
    lines, last = 0, b"\n"
    try:
        with open_binary(path) as handle:
            while True:
                block = handle.read(_COUNT_BLOCK)
                if not block:
                    break
                lines += block.count(b"\n")
                last = block[-1:]
    except _STREAM_ERRORS as error:
        raise _corrupt_stream(path, lines, error) from None
    return lines + (last != b"\n")


def _stream_errors() -> Tuple[Type[BaseException], ...]:
    errors: Tuple[Type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return errors


_STREAM_ERRORS = _stream_errors()


def _corrupt_stream(path: str, line_number: int, error: BaseException) -> DataFormatError:
    return DataFormatError(
        f"{path}: cannot read past line {line_number}: {error} (is the file truncated, or is its "
        "compression not what the file name says?)"
    )


class RecordProblem(Exception):
    """Why one line is not a usable record; the caller adds the location (see bad_record_error)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_blank(raw: bytes) -> bool:
    """True for an empty or whitespace-only line (skipped silently)."""
    return not raw.strip()


def _invalid_utf8_detail(raw: bytes, position: int) -> str:
    """'invalid UTF-8 at byte N of the line', naming the key whose value holds it when that can be told."""
    where = f"invalid UTF-8 at byte {position + 1} of the line"
    try:
        record = json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError:
        return where
    if isinstance(record, dict):
        for key, value in record.items():
            if isinstance(value, str) and any("\udc80" <= char <= "\udcff" for char in value):
                return f"{where} (in the value of key '{key}')"
    return where


def parse_record(raw: bytes, json_keys: Sequence[str] = ("text",)) -> dict:
    """Decode one JSONL line and check that every key in `json_keys` holds a string.

    Raises RecordProblem with one of BAD_RECORD_REASONS.
    """
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordProblem("invalid_utf8", _invalid_utf8_detail(raw, error.start)) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordProblem("malformed_json", f"malformed JSON: {error.msg} (character {error.pos + 1})") from None
    if not isinstance(record, dict):
        raise RecordProblem("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    for key in json_keys:
        if key not in record:
            present = ", ".join(repr(name) for name in list(record)[:8]) or "none"
            raise RecordProblem("missing_key", f"missing key '{key}' (keys present: {present})")
        if not isinstance(record[key], str):
            kind = "null" if record[key] is None else type(record[key]).__name__
            raise RecordProblem("non_string_value", f"key '{key}' holds {kind}, expected a string")
    if b"\\ud" in raw or b"\\uD" in raw:  # a JSON escape of a lone UTF-16 surrogate is no Unicode text
        for key in json_keys:
            try:
                record[key].encode("utf-8")
            except UnicodeEncodeError as error:
                code = ord(record[key][error.start])
                raise RecordProblem(
                    "invalid_utf8", f"key '{key}' holds an unpaired surrogate escape (\\u{code:04x}), not valid text"
                ) from None
    return record


def bad_record_error(path: str, line_number: int, problem: RecordProblem) -> BadRecordError:
    """The user-facing error for a bad line: 'FILE:LINE: detail'."""
    return BadRecordError(f"{path}:{line_number}: {problem.detail}")


@dataclass
class BadRecordStats:
    """Counts of skipped records by reason, with the locations of the first few."""

    counts: Dict[str, int] = field(default_factory=dict)
    examples: List[str] = field(default_factory=list)

    def add(self, reason: str, location: str = "", detail: str = "") -> None:
        """Count one skipped record; keep its location and detail while fewer than 5 are kept."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if location and len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{location}: {detail}" if detail else location)

    def merge(self, other: "BadRecordStats") -> None:
        """Add another BadRecordStats' counts (and examples, up to the limit) to this one."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])

    @property
    def total(self) -> int:
        """Number of skipped records."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. 'skipped 3 bad records (malformed_json: 2, missing_key: 1)'."""
        if not self.total:
            return "skipped 0 bad records"
        parts = ", ".join(f"{reason}: {self.counts[reason]}" for reason in sorted(self.counts))
        return f"skipped {self.total} bad record{'s' if self.total != 1 else ''} ({parts})"

    def to_dict(self) -> dict:
        """JSON-serialisable form (for manifests and summaries)."""
        return {"total": self.total, "counts": dict(sorted(self.counts.items())), "examples": list(self.examples)}


def iter_records(
    path: str,
    json_keys: Sequence[str] = ("text",),
    skip_bad_records: bool = False,
    stats: Optional[BadRecordStats] = None,
) -> Iterator[Tuple[int, dict]]:
    """Yield (1-based line number, record) for each record of a JSONL file (plain, .gz or .zst).

    Each record is a JSON object in which every key of `json_keys` holds a string. A line that is
    not raises BadRecordError "FILE:LINE: ..." naming the key, or, with `skip_bad_records`, is
    skipped and counted in `stats` by reason. Blank lines are skipped silently.
    """
    for line_number, raw in iter_lines(path):
        if is_blank(raw):
            continue
        try:
            record = parse_record(raw, json_keys)
        except RecordProblem as problem:
            if not skip_bad_records:
                raise bad_record_error(path, line_number, problem) from None
            if stats is not None:
                stats.add(problem.reason, f"{path}:{line_number}", problem.detail)
            continue
        yield line_number, record
