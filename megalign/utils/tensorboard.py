"""Dependency-free TensorBoard scalar logging: an event-file writer and a verifying reader.

The file format is TensorBoard's: a sequence of TFRecords, each

    u64 length (little-endian) | u32 masked CRC32C of those 8 bytes | data | u32 masked CRC32C of data

whose data is a serialized ``tensorflow.Event`` protobuf. The first record carries
``file_version = "brain.Event:2"``; every scalar is then one Event with ``wall_time``, ``step`` and a
``Summary`` holding one ``Value{tag, simple_value}``. The protobuf is hand-encoded (only the few
fields above are needed), and CRC32C is implemented here, so neither tensorflow, tensorboard nor
protobuf is required.

    with TensorBoardWriter("runs/exp1") as tb:
        tb.add_scalar("train/loss", 2.31, step=10)
        tb.add_scalars({"train/lr": 3e-4, "train/grad_norm": 1.7}, step=10)

    read_scalars(path)  # -> [("train/loss", 10, 2.309999942779541), ...]
"""
from __future__ import annotations

import itertools
import math
import operator
import os
import socket
import struct
import threading
import time
from typing import Any, BinaryIO, List, Mapping, Optional, Tuple, Union

from megalign.errors import ConfigError, DataFormatError

PathLike = Union[str, "os.PathLike[str]"]

FILE_VERSION = "brain.Event:2"
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

# ----------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), reflected polynomial 0x82F63B78, table-driven.


def _make_crc32c_table() -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of `data`; pass a previous result as `crc` to continue a running checksum."""
    table = _CRC32C_TABLE
    crc ^= _U32
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


# ----------------------------------------------------------------------------------------------------
# Minimal protobuf encoding (wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).


def _varint(value: int) -> bytes:
    """Base-128 varint; negative int64 values are encoded as their 64-bit two's complement."""
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _float32_bytes(value: float) -> bytes:
    """Little-endian float32; finite values beyond float32 range become +-inf (as a float32 cast would)."""
    try:
        return struct.pack("<f", value)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, value))


def _encode_event(wall_time: float, step: Optional[int] = None, summary: Optional[bytes] = None,
                  file_version: Optional[str] = None) -> bytes:
    """Serialize an Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5}."""
    parts = [_key(1, 1) + struct.pack("<d", wall_time)]
    if step is not None:
        parts.append(_key(2, 0) + _varint(step))
    if file_version is not None:
        parts.append(_length_delimited(3, file_version.encode("utf-8")))
    if summary is not None:
        parts.append(_length_delimited(5, summary))
    return b"".join(parts)


def _encode_scalar_summary(tag: str, value: float) -> bytes:
    """Serialize Summary{value=1: Value{tag=1 string, simple_value=2 float}}."""
    value_msg = _length_delimited(1, tag.encode("utf-8")) + _key(2, 5) + _float32_bytes(value)
    return _length_delimited(1, value_msg)


def _frame(data: bytes) -> bytes:
    """Wrap `data` in a TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# ----------------------------------------------------------------------------------------------------
# Writer

_FILE_COUNTER = itertools.count()
_FILE_COUNTER_LOCK = threading.Lock()


def _check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"TensorBoard tag must be a non-empty string, got {tag!r}")
    return tag


def _check_value(tag: str, value: Any) -> float:
    if isinstance(value, (str, bytes)):
        raise ValueError(f"TensorBoard scalar {tag!r}: value must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"TensorBoard scalar {tag!r}: cannot convert {type(value).__name__} value {value!r} "
                         f"to float ({exc})") from exc


def _check_step(step: Any) -> int:
    try:
        step = operator.index(step)
    except TypeError as exc:
        raise ValueError(f"TensorBoard step must be an integer, got {type(step).__name__} {step!r}") from exc
    if not -(1 << 63) <= step < (1 << 63):
        raise ValueError(f"TensorBoard step {step} does not fit in int64")
    return step


class TensorBoardWriter:
    """Append scalar events to a new TensorBoard event file in `log_dir` (created if missing).

    Records are buffered in memory and written whole: every `max_queue` records, when more than
    `flush_secs` seconds have passed since the last write (checked on each add), on `flush()` and on
    `close()`. Each flush is a single write call of complete records on an O_APPEND handle, so the file
    never holds a partial record unless the OS itself fails mid-write.
    """

    def __init__(self, log_dir: PathLike, filename_suffix: str = "", *, max_queue: int = 10,
                 flush_secs: float = 10.0) -> None:
        if os.sep in filename_suffix or "\0" in filename_suffix:
            raise ValueError(f"filename_suffix {filename_suffix!r} must not contain a path separator")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if flush_secs < 0:
            raise ValueError(f"flush_secs must be >= 0, got {flush_secs}")
        self.log_dir = os.fspath(log_dir)
        if os.path.exists(self.log_dir) and not os.path.isdir(self.log_dir):
            raise ConfigError(f"TensorBoard log dir {self.log_dir!r} exists and is not a directory; "
                              "pass a directory path")
        os.makedirs(self.log_dir, exist_ok=True)
        self.max_queue = max_queue
        self.flush_secs = flush_secs
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._pending: List[bytes] = []
        self._fd: Optional[int] = None
        self.path, self._fd = self._create_file(filename_suffix)
        self._last_flush = time.monotonic()
        self._pending.append(_frame(_encode_event(time.time(), file_version=FILE_VERSION)))
        self.flush()

    def _create_file(self, suffix: str) -> Tuple[str, int]:
        """Create a fresh event file (never reusing an existing one) and return (path, append fd)."""
        stamp, host, pid = int(time.time()), socket.gethostname(), os.getpid()
        while True:
            with _FILE_COUNTER_LOCK:
                counter = next(_FILE_COUNTER)
            path = os.path.join(self.log_dir, f"events.out.tfevents.{stamp}.{host}.{pid}.{counter}{suffix}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            return path, fd

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._fd is None

    def add_scalar(self, tag: str, value: float, step: int, wall_time: Optional[float] = None) -> None:
        """Log one scalar; `value` goes through float() and is stored as float32 (NaN/inf kept)."""
        tag = _check_tag(tag)
        self._append([(tag, _check_value(tag, value))], _check_step(step), wall_time)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log several scalars at one step (one Event each, same wall time); all are validated first."""
        checked = [(_check_tag(tag), _check_value(tag, value)) for tag, value in values.items()]
        self._append(checked, _check_step(step), None)

    def _append(self, scalars: List[Tuple[str, float]], step: int, wall_time: Optional[float]) -> None:
        wall = time.time() if wall_time is None else float(wall_time)
        records = [_frame(_encode_event(wall, step=step, summary=_encode_scalar_summary(tag, value)))
                   for tag, value in scalars]
        with self._lock:
            if self._fd is None:
                raise ValueError(f"TensorBoardWriter for {self.path} is closed")
            self._pending.extend(records)
            due = time.monotonic() - self._last_flush >= self.flush_secs
            if len(self._pending) >= self.max_queue or due:
                self._flush_locked()

    def flush(self) -> None:
        """Write all buffered records to the file."""
        with self._lock:
            if self._fd is not None:
                self._flush_locked()

    def _flush_locked(self) -> None:
        assert self._fd is not None
        if self._pending:
            data = memoryview(b"".join(self._pending))
            self._pending.clear()
            while data:  # one write call; the loop only continues after a short write
                written = os.write(self._fd, data)
                data = data[written:]
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close the file; further adds raise ValueError. Safe to call twice."""
        with self._lock:
            if self._fd is None:
                return
            try:
                self._flush_locked()
            finally:
                fd, self._fd = self._fd, None
                os.close(fd)

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A forked child (e.g. a DataLoader worker) must not flush the parent's buffered records again.
        if getattr(self, "_fd", None) is not None and getattr(self, "_owner_pid", None) == os.getpid():
            try:
                self.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------------
# Reader


class _ProtoError(Exception):
    """Malformed protobuf bytes (converted to DataFormatError with the file and offset)."""


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise _ProtoError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise _ProtoError("varint longer than 10 bytes")


def _fields(data: bytes) -> List[Tuple[int, int, Any]]:
    """Split a protobuf message into (field number, wire type, raw value) triples."""
    out: List[Tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(data):
                raise _ProtoError(f"truncated fixed{size * 8} field {field}")
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise _ProtoError(f"length-delimited field {field} runs past the end")
            value, pos = data[pos:pos + size], pos + size
        else:
            raise _ProtoError(f"unsupported wire type {wire} for field {field}")
        out.append((field, wire, value))
    return out


def _decode_scalars(event: bytes) -> List[Tuple[str, int, float]]:
    """(tag, step, simple_value) for every simple_value in one serialized Event."""
    step = 0
    summaries: List[bytes] = []
    for field, wire, value in _fields(event):
        if field == 2 and wire == 0:
            step = value - (1 << 64) if value >> 63 else value
        elif field == 5 and wire == 2:
            summaries.append(value)
    scalars = []
    for summary in summaries:
        for field, wire, value_msg in _fields(summary):
            if field != 1 or wire != 2:
                continue
            tag, simple = "", None
            for vfield, vwire, raw in _fields(value_msg):
                if vfield == 1 and vwire == 2:
                    tag = raw.decode("utf-8", errors="replace")
                elif vfield == 2 and vwire == 5:
                    simple = struct.unpack("<f", raw)[0]
            if simple is not None:
                scalars.append((tag, step, simple))
    return scalars


def _read_exact(handle: BinaryIO, size: int, path: str, offset: int, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise DataFormatError(f"{path}: truncated TensorBoard event record at byte offset {offset}: expected "
                              f"{size} bytes of {what}, found {len(data)}; the file was cut short")
    return data


def read_scalars(path: PathLike) -> List[Tuple[str, int, float]]:
    """Read every (tag, step, simple_value) from a TensorBoard event file, verifying both CRCs per record.

    Raises DataFormatError naming the file and byte offset of a truncated or corrupt record.
    """
    name = os.fspath(path)
    scalars: List[Tuple[str, int, float]] = []
    with open(name, "rb") as handle:
        offset = 0
        while True:
            header = handle.read(8)
            if not header:
                return scalars
            if len(header) < 8:
                raise DataFormatError(f"{name}: truncated TensorBoard event record at byte offset {offset}: "
                                      f"{len(header)} of 8 length bytes; the file was cut short")
            (length_crc,) = struct.unpack("<I", _read_exact(handle, 4, name, offset + 8, "length CRC"))
            if masked_crc32c(header) != length_crc:
                raise DataFormatError(f"{name}: corrupt TensorBoard event record at byte offset {offset}: "
                                      "length CRC mismatch; the file is damaged")
            (length,) = struct.unpack("<Q", header)
            data = _read_exact(handle, length, name, offset + 12, "event data")
            (data_crc,) = struct.unpack("<I", _read_exact(handle, 4, name, offset + 12 + length, "data CRC"))
            if masked_crc32c(data) != data_crc:
                raise DataFormatError(f"{name}: corrupt TensorBoard event record at byte offset {offset}: "
                                      "data CRC mismatch; the file is damaged")
            try:
                scalars.extend(_decode_scalars(data))
            except (_ProtoError, struct.error) as exc:
                raise DataFormatError(f"{name}: malformed Event protobuf in record at byte offset {offset}: "
                                      f"{exc}") from exc
            offset += 16 + length


__all__ = ["TensorBoardWriter", "read_scalars", "crc32c", "masked_crc32c", "FILE_VERSION"]
