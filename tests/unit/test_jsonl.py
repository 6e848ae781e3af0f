"""JSONL reading: input globs, plain/gzip/zstd files, per-line validation with FILE:LINE errors."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import List

import pytest
import zstandard

from megalign.data.jsonl import (
    BadRecordStats,
    count_lines,
    expand_inputs,
    iter_lines,
    iter_records,
    open_text,
)
from megalign.errors import BadRecordError, DataFormatError

RECORDS = [
    {"text": "مرحبا بالعالم", "id": "a"},
    {"text": "second line\nwith an escaped newline", "id": "b"},
    {"text": "", "id": "c"},
    {"text": "«اقتباس» 🙂 café", "id": "d"},
]


def jsonl_bytes(records: List[dict], blank_after: int = 1) -> bytes:
    """RECORDS as JSONL with a blank line after record `blank_after` (1-based)."""
    lines = []
    for number, record in enumerate(records, start=1):
        lines.append(json.dumps(record, ensure_ascii=False))
        if number == blank_after:
            lines.append("   ")
    return ("\n".join(lines) + "\n").encode("utf-8")


def write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith((".zst", ".zstd")):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.jsonl.zstd"])
def test_iter_records_reads_every_format_with_line_numbers(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, jsonl_bytes(RECORDS))
    got = list(iter_records(str(path)))
    assert [record for _, record in got] == RECORDS
    assert [line for line, _ in got] == [1, 3, 4, 5]  # the blank line 2 is skipped but counted
    assert open_text(str(path)).read() == jsonl_bytes(RECORDS).decode("utf-8")
    assert count_lines(str(path)) == 5


def test_multi_frame_zstd_and_missing_final_newline(tmp_path: Path) -> None:
    data = jsonl_bytes(RECORDS).rstrip(b"\n")
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(compressor.compress(data[:25]) + compressor.compress(data[25:]))
    assert [record for _, record in iter_records(str(path))] == RECORDS
    assert count_lines(str(path)) == 5


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert list(iter_records(str(path))) == [(1, {"text": "a"}), (2, {"text": "b"})]


BAD_LINES = [
    (b'{"text": "ok", ', "malformed_json", "malformed JSON"),
    (b'["text"]', "not_an_object", "expected a JSON object, got list"),
    (b'{"body": "x"}', "missing_key", "missing key 'text'"),
    (b'{"text": null}', "non_string_value", "key 'text' holds null, expected a string"),
    (b'{"text": 17}', "non_string_value", "key 'text' holds int, expected a string"),
    (b'{"text": ["a", "b"]}', "non_string_value", "key 'text' holds list, expected a string"),
    (b'{"text": "caf\xc3"}', "invalid_utf8", "invalid UTF-8 at byte 14 of the line (in the value of key 'text')"),
]


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz", "bad.jsonl.zst"])
@pytest.mark.parametrize("line, reason, message", BAD_LINES, ids=[reason for _, reason, _ in BAD_LINES])
def test_bad_record_names_file_line_and_key(tmp_path: Path, name: str, line: bytes, reason: str, message: str) -> None:
    path = write(tmp_path / name, jsonl_bytes(RECORDS[:2]) + b"\n" + line + b"\n" + jsonl_bytes(RECORDS[2:], 0))
    # lines: 1 record, 2 blank, 3 record, 4 blank, 5 bad, 6.. records
    with pytest.raises(BadRecordError) as caught:
        list(iter_records(str(path)))
    assert str(caught.value).startswith(f"{path}:5: {message}")

    stats = BadRecordStats()
    got = list(iter_records(str(path), skip_bad_records=True, stats=stats))
    assert [record for _, record in got] == RECORDS
    assert [number for number, _ in got] == [1, 3, 6, 7]
    assert stats.counts == {reason: 1} and stats.total == 1
    assert stats.examples[0].startswith(f"{path}:5: ")


def test_every_key_is_checked(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.jsonl", b'{"text": "a", "aligned_text": "b"}\n{"text": "a"}\n')
    assert len(list(iter_records(str(path), json_keys=("text",)))) == 2
    with pytest.raises(BadRecordError, match=r"keys\.jsonl:2: missing key 'aligned_text'"):
        list(iter_records(str(path), json_keys=("text", "aligned_text")))


def test_skip_mode_counts_by_reason(tmp_path: Path) -> None:
    lines = [b'{"text": "a"}', b"{oops", b"{oops", b'{"x": 1}', b'{"text": 3}', b"\xff", b"[]", b'{"text": "b"}']
    path = write(tmp_path / "mixed.jsonl.gz", b"\n".join(lines) + b"\n")
    stats = BadRecordStats()
    got = list(iter_records(str(path), skip_bad_records=True, stats=stats))
    assert [number for number, _ in got] == [1, 8]
    assert stats.counts == {"malformed_json": 2, "missing_key": 1, "non_string_value": 1, "invalid_utf8": 1,
                            "not_an_object": 1}
    assert stats.summary() == ("skipped 6 bad records (invalid_utf8: 1, malformed_json: 2, missing_key: 1, "
                               "non_string_value: 1, not_an_object: 1)")
    assert len(stats.examples) == 5 and stats.examples[0].startswith(f"{path}:2: malformed JSON")
    other = BadRecordStats()
    other.add("missing_key", "f:9", "missing key 'text'")
    stats.merge(other)
    assert stats.counts["missing_key"] == 2 and len(stats.examples) == 5
    assert stats.to_dict()["total"] == 7


@pytest.mark.parametrize("name", ["cut.jsonl.gz", "cut.jsonl.zst"])
def test_truncated_compressed_file_is_an_error_not_a_short_corpus(tmp_path: Path, name: str) -> None:
    full = write(tmp_path / name, jsonl_bytes(RECORDS * 50)).read_bytes()
    (tmp_path / name).write_bytes(full[: len(full) - 12])
    with pytest.raises(DataFormatError, match=rf"{name}: cannot read past line \d+"):
        list(iter_records(str(tmp_path / name)))
    with pytest.raises(DataFormatError, match=name):
        count_lines(str(tmp_path / name))


def test_wrong_compression_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl.zst"
    path.write_bytes(jsonl_bytes(RECORDS))
    with pytest.raises(DataFormatError, match="plain.jsonl.zst: cannot read past line 0"):
        list(iter_lines(str(path)))


def test_expand_inputs_sorts_deduplicates_and_expands_directories(tmp_path: Path) -> None:
    for name in ["b.jsonl", "a.jsonl.gz", "c.jsonl.zst", "notes.txt", "manifest.json"]:
        write(tmp_path / name, jsonl_bytes(RECORDS[:1]))
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "d.jsonl", jsonl_bytes(RECORDS[:1]))
    expected = [str(tmp_path / n) for n in ["a.jsonl.gz", "b.jsonl", "c.jsonl.zst"]]
    assert expand_inputs([str(tmp_path / "*.jsonl*")]) == expected
    assert expand_inputs([str(tmp_path)]) == expected  # a directory means its JSONL files, not recursive
    assert expand_inputs([str(tmp_path / "b.jsonl"), str(tmp_path / "*.jsonl*"), str(tmp_path / "b.jsonl")]) == expected
    recursive = [str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / "d.jsonl")]
    assert expand_inputs([str(tmp_path / "**" / "*.jsonl")]) == recursive


def test_expand_inputs_rejects_patterns_matching_nothing(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", jsonl_bytes(RECORDS[:1]))
    missing = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(DataFormatError, match="matches no file") as caught:
        expand_inputs([str(tmp_path / "a.jsonl"), missing])
    assert missing in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="holds no JSONL files"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataFormatError, match="no input given"):
        expand_inputs([])


def test_missing_file_is_a_data_format_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        list(iter_records(str(tmp_path / "gone.jsonl")))
