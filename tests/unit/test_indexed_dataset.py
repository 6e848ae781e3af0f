"""The Megatron-compatible indexed dataset: round trips, layout, validation, atomicity, merge CLI."""
from __future__ import annotations

import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import List, Sequence

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalign import cli
from megalign.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_token_dtype,
    data_file_path,
    dataset_exists,
    index_file_path,
    merge_datasets,
)
from megalign.errors import DataFormatError

Document = List[List[int]]  # a document is a list of sequences of token ids


def write_documents(prefix: str, documents: Sequence[Document], dtype) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for document in documents:
            flat = [token for sequence in document for token in sequence]
            builder.add_document(numpy.array(flat, dtype=numpy.int64), [len(s) for s in document])


def reference_index(documents: Sequence[Document], code: int) -> bytes:
    """MMIDIDX v1 bytes written from the format description alone, one struct.pack at a time."""
    itemsize = numpy.dtype(DTYPE_CODES[code]).itemsize
    lengths = [len(sequence) for document in documents for sequence in document]
    boundaries = [0]
    for document in documents:
        boundaries.append(boundaries[-1] + len(document))
    pointers, position = [], 0
    for length in lengths:
        pointers.append(position)
        position += length * itemsize
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(boundaries))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    out += b"".join(struct.pack("<q", p) for p in pointers)
    out += b"".join(struct.pack("<q", b) for b in boundaries)
    return out


def all_sequences(documents: Sequence[Document]) -> List[List[int]]:
    return [sequence for document in documents for sequence in document]


DOCS: List[Document] = [[[1, 2, 3], [4]], [[5, 6]], [[], [7, 8, 9, 10]], [[11]]]


@pytest.fixture
def small(tmp_path: Path) -> str:
    prefix = str(tmp_path / "small")
    write_documents(prefix, DOCS, numpy.uint16)
    return prefix


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path: Path, code: int) -> None:
    dtype = numpy.dtype(DTYPE_CODES[code])
    high = 100 if dtype.kind == "f" else int(numpy.iinfo(dtype).max)
    low = -100 if dtype.kind == "f" else int(numpy.iinfo(dtype).min)
    documents = [[[low, 0, high], [1]], [[high - 1, low + 1]]]
    prefix = str(tmp_path / f"d{code}")
    write_documents(prefix, documents, dtype)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == dtype and len(dataset) == 3 and dataset.num_tokens == 6
    for got, want in zip(dataset[:], all_sequences(documents)):
        assert got.dtype == dtype
        numpy.testing.assert_array_equal(got, numpy.array(want, dtype=dtype))
    assert Path(index_file_path(prefix)).read_bytes() == reference_index(documents, code)


def test_documents_with_several_sequences(small: str) -> None:
    dataset = IndexedDataset(small)
    assert len(dataset) == 6 and dataset.num_documents == 4 and dataset.num_tokens == 11
    assert dataset.document_indices.tolist() == [0, 2, 3, 5, 6]
    assert dataset.sequence_lengths.tolist() == [3, 1, 2, 0, 4, 1]
    assert dataset.sequence_pointers.tolist() == [0, 6, 8, 12, 12, 20]
    assert dataset.sequence_lengths.dtype == numpy.int32 and dataset.sequence_pointers.dtype == numpy.int64
    assert [s.tolist() for s in dataset.document(2)] == [[], [7, 8, 9, 10]]
    assert [s.tolist() for s in dataset.document(-1)] == [[11]]


def test_get_with_offset_and_length_is_a_read_only_view(small: str) -> None:
    dataset = IndexedDataset(small)
    assert dataset.get(4).tolist() == [7, 8, 9, 10]
    assert dataset.get(4, offset=1).tolist() == [8, 9, 10]
    assert dataset.get(4, offset=1, length=2).tolist() == [8, 9]
    assert dataset.get(4, offset=4).tolist() == []
    assert dataset.get(-1).tolist() == [11]
    part = dataset.get(4, 1, 2)
    assert not part.flags.owndata and not part.flags.writeable
    for bad in [dict(offset=5), dict(offset=-1), dict(offset=2, length=3), dict(length=-1)]:
        with pytest.raises(IndexError):
            dataset.get(4, **bad)
    with pytest.raises(IndexError):
        dataset.get(6)
    with pytest.raises(TypeError):
        dataset["0"]  # type: ignore[index]


def test_slices(small: str) -> None:
    dataset = IndexedDataset(small)
    sequences = all_sequences(DOCS)
    for selection in [slice(None), slice(1, 4), slice(None, None, 2), slice(-2, None), slice(5, 1, -1), slice(3, 3)]:
        assert [s.tolist() for s in dataset[selection]] == sequences[selection]
    assert dataset[numpy.int64(2)].tolist() == [5, 6]


def test_empty_sequences_documents_and_dataset(tmp_path: Path) -> None:
    prefix = str(tmp_path / "empty")
    with IndexedDatasetBuilder(prefix, numpy.int32):
        pass
    dataset = IndexedDataset(prefix)
    assert (len(dataset), dataset.num_documents, dataset.num_tokens, dataset[:]) == (0, 0, 0, [])
    assert os.path.getsize(data_file_path(prefix)) == 0

    prefix = str(tmp_path / "hollow")
    with IndexedDatasetBuilder(prefix, numpy.uint16) as builder:
        builder.add_item([])
        builder.end_document()
        builder.end_document()  # a document with no sequences
        builder.add_document([], lengths=[])
        builder.add_document([])  # one empty sequence
    dataset = IndexedDataset(prefix)
    assert dataset.document_indices.tolist() == [0, 1, 1, 1, 2]
    assert all(s.size == 0 for s in dataset[:])
    assert len(dataset) == 2 and dataset.num_tokens == 0


def test_add_item_and_end_document_match_add_document(tmp_path: Path) -> None:
    by_items = str(tmp_path / "items")
    with IndexedDatasetBuilder(by_items, numpy.uint16) as builder:
        for document in DOCS:
            for sequence in document:
                builder.add_item(sequence)
            builder.end_document()
    by_documents = str(tmp_path / "docs")
    write_documents(by_documents, DOCS, numpy.uint16)
    for path in (data_file_path, index_file_path):
        assert Path(path(by_items)).read_bytes() == Path(path(by_documents)).read_bytes()


def test_open_document_is_closed_by_finalize_and_add_index(tmp_path: Path, small: str) -> None:
    prefix = str(tmp_path / "open")
    with IndexedDatasetBuilder(prefix, numpy.uint16) as builder:
        builder.add_item([1, 2])
        builder.add_index(small)  # closes [1, 2] as its own document first
        builder.add_item([3])
    dataset = IndexedDataset(prefix)
    assert dataset.document_indices.tolist() == [0, 1, 3, 4, 6, 7, 8]
    assert [s.tolist() for s in dataset[:]] == [[1, 2]] + all_sequences(DOCS) + [[3]]


def test_merge_equals_writing_everything_at_once(tmp_path: Path) -> None:
    shards = [DOCS[:1], DOCS[1:3], [], DOCS[3:]]
    prefixes = []
    for number, documents in enumerate(shards):
        prefixes.append(str(tmp_path / f"shard{number}"))
        write_documents(prefixes[-1], documents, numpy.uint16)
    merge_datasets(prefixes, str(tmp_path / "merged"), progress=False)
    write_documents(str(tmp_path / "whole"), DOCS, numpy.uint16)
    for path in (data_file_path, index_file_path):
        assert Path(path(str(tmp_path / "merged"))).read_bytes() == Path(path(str(tmp_path / "whole"))).read_bytes()


def test_merge_refuses_mixed_dtypes_before_writing(tmp_path: Path) -> None:
    write_documents(str(tmp_path / "a"), DOCS, numpy.uint16)
    write_documents(str(tmp_path / "b"), DOCS, numpy.int32)
    with pytest.raises(DataFormatError, match=r"b\.idx.*int32.*a\.idx.*uint16"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), progress=False)
    with pytest.raises(DataFormatError, match="dtypes agree"):
        with IndexedDatasetBuilder(str(tmp_path / "out"), numpy.uint16) as builder:
            builder.add_index(str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


# Layout of the `small` fixture: 6 sequences, 5 boundaries; lengths at 34, pointers at 58, documents at 106.
CORRUPTIONS = {
    "wrong magic": ("idx", lambda i, b: _patch(i, 0, b"NOTANIDX\x00"), "wrong magic"),
    "unknown version": ("idx", lambda i, b: _patch(i, 9, struct.pack("<Q", 2)), "unknown index version 2"),
    "unknown dtype": ("idx", lambda i, b: _patch(i, 17, b"\x09"), "unknown dtype code 9"),
    "empty index": ("idx", lambda i, b: _truncate(i, 0), "shorter than its 34-byte header"),
    "truncated header": ("idx", lambda i, b: _truncate(i, 20), "shorter than its 34-byte header"),
    "truncated arrays": ("idx", lambda i, b: _truncate(i, 140), "which need 146 bytes"),
    "trailing bytes": ("idx", lambda i, b: open(i, "ab").write(b"\x00" * 3), "3 bytes of trailing data"),
    "sequence count too big": ("idx", lambda i, b: _patch(i, 18, struct.pack("<Q", 10**12)), "which need"),
    "bad pointer": ("idx", lambda i, b: _patch(i, 58 + 8 * 2, struct.pack("<q", 10)), "sequence 2 points to byte 10"),
    "negative length": ("idx", lambda i, b: _patch(i, 34 + 4, struct.pack("<i", -1)), "negative length"),
    "length past bin": ("idx", lambda i, b: _patch(i, 34 + 4 * 5, struct.pack("<i", 2)), "describes 24 bytes"),
    "documents not monotonic": ("idx", lambda i, b: _patch(i, 106 + 16, struct.pack("<q", 1)), "not monotonic"),
    "documents not from 0": ("idx", lambda i, b: _patch(i, 106, struct.pack("<q", 1)), "start at 1"),
    "documents short of end": ("idx", lambda i, b: _patch(i, 106 + 32, struct.pack("<q", 5)), "end at 5"),
    "no documents": ("idx", lambda i, b: (_patch(i, 26, struct.pack("<Q", 0)), _truncate(i, 106)), "no document"),
    "truncated bin": ("bin", lambda i, b: _truncate(b, 20), "data file is 20 bytes"),
    "longer bin": ("bin", lambda i, b: open(b, "ab").write(b"\x00\x00"), "data file is 24 bytes"),
    "missing bin": ("bin", lambda i, b: os.remove(b), "file not found"),
    "missing idx": ("idx", lambda i, b: os.remove(i), "file not found"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_files_raise_data_format_error_naming_the_file(small: str, case: str) -> None:
    which, damage, expected = CORRUPTIONS[case]
    idx, binary = index_file_path(small), data_file_path(small)
    assert os.path.getsize(idx) == 146  # the offsets above assume this layout
    damage(idx, binary)
    with pytest.raises(DataFormatError) as caught:
        IndexedDataset(small)
    message = str(caught.value)
    assert (idx if which == "idx" else binary) in message
    assert expected in message and "re-run preprocessing" in message


@pytest.mark.parametrize(
    "tokens, dtype, expected",
    [
        ([1, 70000], numpy.uint16, "token id 70000 does not fit"),
        ([-1, 3], numpy.uint16, "token id -1 does not fit"),
        (numpy.array([1.0, 2.0]), numpy.int32, "must be integers"),
        ([[1, 2], [3, 4]], numpy.int32, "1-D"),
    ],
)
def test_builder_refuses_tokens_the_dtype_cannot_hold(tmp_path: Path, tokens, dtype, expected: str) -> None:
    with IndexedDatasetBuilder(str(tmp_path / "x"), dtype) as builder:
        with pytest.raises(DataFormatError, match=expected):
            builder.add_item(tokens)
        with pytest.raises(DataFormatError, match="summing to 3"):
            builder.add_document([1, 2], lengths=[1, 2])
        builder.add_item(numpy.array([65535], dtype=numpy.int64))  # in range: accepted
    assert IndexedDataset(str(tmp_path / "x"))[0].tolist() == [65535]
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "y"), numpy.complex64)


def test_exception_in_builder_leaves_nothing_and_keeps_previous_dataset(tmp_path: Path, small: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(str(tmp_path / "new"), numpy.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise RuntimeError("boom")
    before = {p: Path(p).read_bytes() for p in (data_file_path(small), index_file_path(small))}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(small, numpy.uint16) as builder:
            builder.add_document(list(range(1000)))
            assert IndexedDataset(small).num_tokens == 11  # the old dataset is untouched before finalize
            raise RuntimeError("boom")
    assert {p: Path(p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["small.bin", "small.idx"]  # no temporaries left behind


def test_finalize_replaces_previous_dataset_and_sets_permissions(tmp_path: Path, small: str) -> None:
    builder = IndexedDatasetBuilder(small, numpy.int32)
    builder.add_document([42, 43])
    assert IndexedDataset(small).dtype == numpy.uint16
    builder.finalize()
    dataset = IndexedDataset(small)
    assert dataset.dtype == numpy.int32 and dataset[:][0].tolist() == [42, 43]
    assert sorted(os.listdir(tmp_path)) == ["small.bin", "small.idx"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(index_file_path(small)).st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError, match="already finalized"):
        builder.add_item([1])
    builder.abort()  # after finalize: a no-op, files stay
    assert dataset_exists(small)


def test_dropped_builder_removes_its_temporary_file(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "gone"), numpy.uint16)
    builder.add_item([1, 2])
    assert len(os.listdir(tmp_path)) == 1  # the hidden temporary .bin
    del builder
    assert os.listdir(tmp_path) == []


def test_helpers_and_pickling_for_loader_workers(small: str) -> None:
    assert best_token_dtype(32000) == numpy.uint16 and best_token_dtype(65499) == numpy.uint16
    assert best_token_dtype(65500) == numpy.int32 and best_token_dtype(128256) == numpy.int32
    assert data_file_path("a/b") == "a/b.bin" and index_file_path("a/b") == "a/b.idx"
    assert dataset_exists(small) and not dataset_exists(small + "_nope")
    # DataLoader workers started with "spawn" receive datasets pickled: the state is just the prefix.
    clone = pickle.loads(pickle.dumps(IndexedDataset(small)))
    assert [s.tolist() for s in clone[:]] == all_sequences(DOCS)


@st.composite
def datasets(draw):
    code = draw(st.sampled_from(sorted(DTYPE_CODES)))
    dtype = numpy.dtype(DTYPE_CODES[code])
    low, high = (-1000, 1000) if dtype.kind == "f" else (int(numpy.iinfo(dtype).min), int(numpy.iinfo(dtype).max))
    sequence = st.lists(st.integers(low, high), max_size=6)
    documents = draw(st.lists(st.lists(sequence, max_size=3), max_size=6))
    styles = draw(st.lists(st.booleans(), min_size=len(documents), max_size=len(documents)))
    return code, documents, styles


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_round_trip_property(case) -> None:
    code, documents, styles = case
    dtype = numpy.dtype(DTYPE_CODES[code])
    with tempfile.TemporaryDirectory() as directory:
        prefix = os.path.join(directory, "p")
        with IndexedDatasetBuilder(prefix, DTYPE_CODES[code]) as builder:
            for document, by_items in zip(documents, styles):
                if by_items:
                    for sequence in document:
                        builder.add_item(sequence)
                    builder.end_document()
                else:
                    flat = [token for sequence in document for token in sequence]
                    builder.add_document(flat, [len(s) for s in document])
        dataset = IndexedDataset(prefix)
        assert dataset.num_documents == len(documents)
        assert [s.tolist() for s in dataset[:]] == [numpy.array(s, dtype=dtype).tolist() for s in all_sequences(documents)]
        assert Path(index_file_path(prefix)).read_bytes() == reference_index(documents, code)
        flat_all = [token for sequence in all_sequences(documents) for token in sequence]
        assert Path(data_file_path(prefix)).read_bytes() == numpy.array(flat_all, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()


@settings(max_examples=100, deadline=None)
@given(
    which=st.sampled_from(["idx", "bin"]),
    cut=st.none() | st.integers(0, 160),
    patches=st.lists(st.tuples(st.integers(0, 160), st.integers(0, 255)), max_size=4),
)
def test_any_damage_gives_a_data_format_error_or_a_valid_dataset(which: str, cut, patches) -> None:
    with tempfile.TemporaryDirectory() as directory:
        prefix = os.path.join(directory, "fuzz")
        write_documents(prefix, DOCS, numpy.uint16)
        path = index_file_path(prefix) if which == "idx" else data_file_path(prefix)
        data = bytearray(Path(path).read_bytes())
        for position, value in patches:
            if position < len(data):
                data[position] = value
        Path(path).write_bytes(bytes(data[:cut] if cut is not None else data))
        try:
            dataset = IndexedDataset(prefix)
        except DataFormatError as error:
            assert path in str(error) or index_file_path(prefix) in str(error)
            return
        assert sum(len(s) for s in dataset[:]) == dataset.num_tokens  # accepted files are self-consistent


# --- the `megalign merge-datasets` command -------------------------------------------------------------


def _shards(directory: Path) -> List[str]:
    directory.mkdir()
    prefixes = []
    for number, documents in enumerate([DOCS[:2], DOCS[2:]]):
        prefixes.append(str(directory / f"part_{number:02d}"))
        write_documents(prefixes[-1], documents, numpy.uint16)
    return prefixes


def _assert_is_docs(prefix: str) -> None:
    dataset = IndexedDataset(prefix)
    assert [s.tolist() for s in dataset[:]] == all_sequences(DOCS)
    assert dataset.document_indices.tolist() == [0, 2, 3, 5, 6]


def test_cli_merges_prefixes_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prefixes = _shards(tmp_path / "shards")
    out = str(tmp_path / "merged")
    assert cli.main(["merge-datasets", "--input", prefixes[0], prefixes[1] + ".bin", "--output-prefix", out, "--quiet"]) == 0
    assert "merged 2 datasets" in capsys.readouterr().out
    _assert_is_docs(out)
    (tmp_path / "shards" / "lonely.bin").write_bytes(b"")  # half a pair: skipped with a warning
    for flag in ("--input-dir", "--input"):  # --input DIR is how Megatron's tools/merge_datasets.py is called
        target = str(tmp_path / "shards" / "all")  # inside the directory: never merged into itself
        for _ in range(2):
            assert cli.main(["merge-datasets", flag, str(tmp_path / "shards"), "--output-prefix", target, "--quiet"]) == 0
            _assert_is_docs(target)
        assert "lonely.bin: no matching .idx" in capsys.readouterr().err
        os.remove(data_file_path(target))
        os.remove(index_file_path(target))


def test_cli_reports_bad_inputs_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prefixes = _shards(tmp_path / "shards")
    write_documents(str(tmp_path / "wide"), DOCS, numpy.int32)
    out = str(tmp_path / "out")
    assert cli.main(["merge-datasets", "--input", prefixes[0], str(tmp_path / "wide"), "--output-prefix", out]) == 2
    assert "must share one dtype" in capsys.readouterr().err
    assert cli.main(["merge-datasets", "--input", str(tmp_path / "absent"), "--output-prefix", out]) == 2
    assert "absent.idx: file not found" in capsys.readouterr().err
    (tmp_path / "void").mkdir()
    assert cli.main(["merge-datasets", "--input-dir", str(tmp_path / "void"), "--output-prefix", out]) == 2
    assert "no complete PREFIX.bin/PREFIX.idx pairs" in capsys.readouterr().err
    assert not dataset_exists(out)
