"""TensorBoardWriter / read_scalars: CRC32C vectors, round trip, golden bytes, corruption, and
independent decoding (a bitwise CRC and a generic protobuf walker written here; tensorboard and
protobuf themselves when installed)."""
from __future__ import annotations

import math
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from megalign.errors import ConfigError, DataFormatError
from megalign.utils.tensorboard import TensorBoardWriter, crc32c, masked_crc32c, read_scalars


def f32(value: float) -> float:
    """Round through float32 the way the file stores simple_value."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


# ---------------------------------------------------------------------------------------------------
# Independent oracle: a bit-at-a-time CRC32C and a generic protobuf field walker (no shared code).


def bitwise_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def oracle_mask(crc: int) -> int:
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) % (1 << 32)


def walk(buf: bytes) -> Dict[int, List[Tuple[int, Any]]]:
    """Generic protobuf decoder: field number -> [(wire type, raw int or bytes)]."""
    out: Dict[int, List[Tuple[int, Any]]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value += (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        field, wire = divmod(key, 8)
        if wire == 0:
            val: Any = varint()
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n = varint()
            val, i = buf[i:i + n], i + n
        else:
            raise AssertionError(f"wire type {wire}")
        out.setdefault(field, []).append((wire, val))
    assert i == len(buf), "message overruns its buffer"
    return out


def oracle_records(path: Path) -> List[bytes]:
    """Split a TFRecord file, checking both masked CRCs with the bitwise oracle."""
    raw = path.read_bytes()
    records, pos = [], 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos:pos + 8], "little")
        assert int.from_bytes(raw[pos + 8:pos + 12], "little") == oracle_mask(bitwise_crc32c(raw[pos:pos + 8]))
        data = raw[pos + 12:pos + 12 + length]
        assert len(data) == length
        assert int.from_bytes(raw[pos + 12 + length:pos + 16 + length], "little") == oracle_mask(bitwise_crc32c(data))
        records.append(data)
        pos += 16 + length
    return records


def oracle_events(path: Path) -> List[Dict[str, Any]]:
    events = []
    for data in oracle_records(path):
        fields = walk(data)
        event: Dict[str, Any] = {"wall_time": struct.unpack("<d", fields[1][0][1])[0]}
        assert fields[1][0][0] == 1
        if 2 in fields:
            step = fields[2][0][1]
            event["step"] = step - (1 << 64) if step >= 1 << 63 else step
        if 3 in fields:
            event["file_version"] = fields[3][0][1].decode()
        if 5 in fields:
            values = []
            for wire, value_msg in walk(fields[5][0][1])[1]:
                assert wire == 2
                v = walk(value_msg)
                assert v[2][0][0] == 5
                values.append((v[1][0][1].decode(), struct.unpack("<f", v[2][0][1])[0]))
            event["values"] = values
        events.append(event)
    return events


def event_files(log_dir: Path) -> List[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


SCALARS = [("train/loss", 0, 2.5), ("train/lr", 0, 3e-4), ("train/loss", 1, 0.1), ("val/ppl", 7, 1e30),
           ("train/loss", 2**40, -1.25), ("ünïcode/ταγ", -3, 7.0)]


@pytest.fixture()
def written(tmp_path: Path) -> Path:
    log_dir = tmp_path / "a" / "b"
    with TensorBoardWriter(str(log_dir)) as tb:
        for tag, step, value in SCALARS:
            tb.add_scalar(tag, value, step)
    (path,) = event_files(log_dir)
    return path


# ---------------------------------------------------------------------------------------------------
# CRC32C


@pytest.mark.parametrize("data, expected", [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (b"a", 0xC1D04330),
    (bytes(32), 0x8A9136AA),                # RFC 3720 B.4
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert bitwise_crc32c(data) == expected


def test_crc32c_is_incremental_and_mask_matches_formula() -> None:
    blob = bytes(range(256)) * 5
    assert crc32c(blob[700:], crc32c(blob[:700])) == crc32c(blob) == bitwise_crc32c(blob)
    for data in (b"", b"123456789", blob):
        assert masked_crc32c(data) == oracle_mask(bitwise_crc32c(data))


# ---------------------------------------------------------------------------------------------------
# Writer / reader


def test_round_trip_through_read_scalars(written: Path) -> None:
    assert read_scalars(written) == [(tag, step, f32(value)) for tag, step, value in SCALARS]
    assert read_scalars(str(written))[2][2] != 0.1  # stored as float32, not double


def test_file_name_and_header_record(written: Path, tmp_path: Path) -> None:
    assert written.parent == tmp_path / "a" / "b"
    host, pid = re.escape(socket.gethostname()), os.getpid()
    assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\.{host}\.{pid}\.\d+", written.name)
    events = oracle_events(written)
    assert events[0]["file_version"] == "brain.Event:2"
    assert "values" not in events[0]
    assert len(events) == 1 + len(SCALARS)


def test_independent_decoder_agrees(written: Path) -> None:
    events = oracle_events(written)[1:]
    got = [(e["values"][0][0], e["step"], e["values"][0][1]) for e in events]
    assert got == [(tag, step, f32(value)) for tag, step, value in SCALARS]
    assert all(len(e["values"]) == 1 for e in events)
    assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events)


def test_golden_bytes_of_a_scalar_event(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path) as tb:
        tb.add_scalar("loss", 0.5, 300, wall_time=1700000000.25)
    data = oracle_records(tb_path(tmp_path))[1]
    value = b"\x0a\x04loss" + b"\x15" + struct.pack("<f", 0.5)
    summary = b"\x0a" + bytes([len(value)]) + value
    expected = (b"\x09" + struct.pack("<d", 1700000000.25) + b"\x10\xac\x02"
                + b"\x2a" + bytes([len(summary)]) + summary)
    assert data == expected


def tb_path(log_dir: Path) -> Path:
    (path,) = event_files(log_dir)
    return path


def test_non_finite_and_converted_values(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    with TensorBoardWriter(tmp_path, filename_suffix=".v2") as tb:
        tb.add_scalar("nan", float("nan"), 1)
        tb.add_scalar("inf", math.inf, 1)
        tb.add_scalar("ninf", -math.inf, 1)
        tb.add_scalar("overflow", 1e300, 1)
        tb.add_scalar("np", np.float64(1.5), np.int64(2))
        tb.add_scalar("torch", torch.tensor(0.25), 3)
        tb.add_scalar("int", 7, 4)
        tb.add_scalar("bool", True, 5)
    path = tb_path(tmp_path)
    assert path.name.endswith(".v2")
    rows = read_scalars(path)
    assert math.isnan(rows[0][2])
    assert [r[2] for r in rows[1:4]] == [math.inf, -math.inf, math.inf]
    assert rows[4:] == [("np", 2, 1.5), ("torch", 3, 0.25), ("int", 4, 7.0), ("bool", 5, 1.0)]


def test_add_scalars_writes_one_event_per_value(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path) as tb:
        tb.add_scalars({"a": 1.0, "b": 2.0, "c": 3.0}, step=9)
    events = oracle_events(tb_path(tmp_path))[1:]
    assert [e["values"] for e in events] == [[("a", 1.0)], [("b", 2.0)], [("c", 3.0)]]
    assert {e["step"] for e in events} == {9} and len({e["wall_time"] for e in events}) == 1


@pytest.mark.parametrize("tag", ["", None, 3, b"loss"])
def test_bad_tag_raises(tmp_path: Path, tag: Any) -> None:
    with TensorBoardWriter(tmp_path) as tb:
        with pytest.raises(ValueError, match="tag"):
            tb.add_scalar(tag, 1.0, 0)
        with pytest.raises(ValueError, match="tag"):
            tb.add_scalars({"ok": 1.0, tag: 2.0}, 0)  # validated before anything is queued
    assert read_scalars(tb_path(tmp_path)) == []


@pytest.mark.parametrize("value", ["1.5", None, object(), [1.0, 2.0]])
def test_bad_value_raises(tmp_path: Path, value: Any) -> None:
    with TensorBoardWriter(tmp_path) as tb:
        with pytest.raises(ValueError, match="'loss'"):
            tb.add_scalar("loss", value, 0)


def test_bad_step_raises(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path) as tb:
        with pytest.raises(ValueError, match="step"):
            tb.add_scalar("loss", 1.0, 1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="int64"):
            tb.add_scalar("loss", 1.0, 2**63)


def test_flush_policy_and_close(tmp_path: Path) -> None:
    tb = TensorBoardWriter(tmp_path, max_queue=3, flush_secs=3600)
    path = Path(tb.path)
    header_size = path.stat().st_size
    assert header_size > 0  # header is flushed immediately
    tb.add_scalar("x", 1.0, 0)
    tb.add_scalar("x", 2.0, 1)
    assert path.stat().st_size == header_size
    tb.add_scalar("x", 3.0, 2)  # third record reaches max_queue
    assert [r[2] for r in read_scalars(path)] == [1.0, 2.0, 3.0]
    tb.add_scalar("x", 4.0, 3)
    assert len(read_scalars(path)) == 3
    tb.flush()
    assert len(read_scalars(path)) == 4
    tb.add_scalar("x", 5.0, 4)
    tb.close()
    tb.close()  # idempotent
    assert tb.closed and len(read_scalars(path)) == 5
    with pytest.raises(ValueError, match="closed"):
        tb.add_scalar("x", 6.0, 5)


def test_time_based_flush(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path, max_queue=1000, flush_secs=0.0) as tb:
        tb.add_scalar("x", 1.0, 0)
        assert read_scalars(tb.path) == [("x", 0, 1.0)]


def test_writers_never_share_a_file(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path) as a, TensorBoardWriter(tmp_path) as b:
        a.add_scalar("a", 1.0, 0)
        b.add_scalar("b", 2.0, 0)
    assert a.path != b.path
    assert read_scalars(a.path) == [("a", 0, 1.0)] and read_scalars(b.path) == [("b", 0, 2.0)]


def test_log_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        TensorBoardWriter(tmp_path / "f")
    with pytest.raises(ValueError, match="separator"):
        TensorBoardWriter(tmp_path, filename_suffix="/x")


# ---------------------------------------------------------------------------------------------------
# Corruption


def record_offsets(path: Path) -> List[int]:
    raw, offsets, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        offsets.append(pos)
        pos += 16 + int.from_bytes(raw[pos:pos + 8], "little")
    return offsets


def _damage(path: Path, index: int, xor: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[index] ^= xor
    path.write_bytes(bytes(raw))


def test_flipped_data_byte_names_file_and_offset(written: Path) -> None:
    third = record_offsets(written)[2]
    _damage(written, third + 14)
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(written))}.*byte offset {third}\b.*data CRC"):
        read_scalars(written)


def test_flipped_length_byte_is_caught(written: Path) -> None:
    second = record_offsets(written)[1]
    _damage(written, second, 0x40)
    with pytest.raises(DataFormatError, match=rf"byte offset {second}\b.*length CRC"):
        read_scalars(written)


def test_flipped_crc_byte_is_caught(written: Path) -> None:
    offsets = record_offsets(written)
    _damage(written, offsets[4] - 1)  # last byte of record 3's data CRC
    with pytest.raises(DataFormatError, match=rf"byte offset {offsets[3]}\b.*data CRC"):
        read_scalars(written)


@pytest.mark.parametrize("cut", [1, 5, 10, 20])
def test_truncated_file_names_offset(written: Path, cut: int) -> None:
    last = record_offsets(written)[-1]
    raw = written.read_bytes()
    written.write_bytes(raw[:len(raw) - cut] if cut != 20 else raw[:last + 5])
    with pytest.raises(DataFormatError, match=rf"{re.escape(written.name)}.*truncated.*byte offset \d+"):
        read_scalars(written)
    with pytest.raises(DataFormatError) as info:
        read_scalars(written)
    offset = int(re.search(r"byte offset (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]
    assert last <= offset < len(raw)


def test_valid_crc_but_malformed_protobuf(tmp_path: Path) -> None:
    data = b"\x2a\x10abc"  # summary field claims 16 bytes, has 3
    header = struct.pack("<Q", len(data))
    record = header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
    path = tmp_path / "events.out.tfevents.bad"
    path.write_bytes(record)
    with pytest.raises(DataFormatError, match="malformed Event protobuf.*byte offset 0"):
        read_scalars(path)


def test_reader_accepts_repeated_values_and_skips_unknown_fields(tmp_path: Path) -> None:
    def ld(field: int, payload: bytes) -> bytes:
        return bytes([field << 3 | 2, len(payload)]) + payload

    values = b"".join(ld(1, ld(1, tag) + b"\x15" + struct.pack("<f", v)) for tag, v in ((b"p", 1.0), (b"q", 2.0)))
    image_value = ld(1, ld(1, b"img") + ld(4, b"\x08\x01"))  # a Value with an image, no simple_value
    data = b"\x09" + struct.pack("<d", 1.0) + b"\x10\x05" + b"\x38\x07" + ld(5, values + image_value)
    header = struct.pack("<Q", len(data))
    path = tmp_path / "events.out.tfevents.multi"
    path.write_bytes(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))
    assert read_scalars(path) == [("p", 5, 1.0), ("q", 5, 2.0)]
    assert read_scalars(tmp_path / "events.out.tfevents.multi") == read_scalars(str(path))


def test_empty_file_has_no_scalars(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert read_scalars(path) == []


# ---------------------------------------------------------------------------------------------------
# Real TensorBoard / protobuf, when installed


def test_tensorboard_event_accumulator_reads_file(written: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(written.parent), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    expected: Dict[str, List[Tuple[int, float]]] = {}
    for tag, step, value in SCALARS:
        expected.setdefault(tag, []).append((step, f32(value)))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, rows in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == rows


def test_protobuf_event_pb2_parses_records(written: Path) -> None:
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    events = []
    for data in oracle_records(written):
        event = event_pb2.Event()
        event.ParseFromString(data)
        events.append(event)
    assert events[0].file_version == "brain.Event:2"
    got = [(e.summary.value[0].tag, e.step, e.summary.value[0].simple_value) for e in events[1:]]
    assert got == [(tag, step, f32(value)) for tag, step, value in SCALARS]
