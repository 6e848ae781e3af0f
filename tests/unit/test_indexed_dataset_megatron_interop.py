"""Files move both ways between megalign and megatron-core's IndexedDataset (skipped without megatron-core)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List

import numpy
import pytest

with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
torch = pytest.importorskip("torch")

from megalign.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    merge_datasets,
)

pytestmark = pytest.mark.megatron

# documents of sequences; includes an empty sequence and a document without sequences
DOCUMENTS: List[List[List[int]]] = [[[1, 2, 3], [4]], [[5, 6, 7, 8]], [[], [9]], [], [[10, 11]]]
DTYPES = [numpy.uint8, numpy.uint16, numpy.int32, numpy.int64, numpy.float32]


def _flat(document: List[List[int]]) -> List[int]:
    return [token for sequence in document for token in sequence]


def _write_ours(prefix: str, dtype, documents=DOCUMENTS) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for document in documents:
            builder.add_document(_flat(document), [len(s) for s in document])


def _write_megatron(prefix: str, dtype, documents=DOCUMENTS) -> None:
    builder = megatron_indexed.IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    for document in documents:
        builder.add_document(numpy.array(_flat(document), dtype=numpy.int64), [len(s) for s in document])
    builder.finalize(index_file_path(prefix))


def _same_files(first: str, second: str) -> None:
    for path in (data_file_path, index_file_path):
        assert Path(path(first)).read_bytes() == Path(path(second)).read_bytes(), path(first)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: numpy.dtype(d).name)
def test_megatron_reads_what_we_write_and_files_are_identical(tmp_path: Path, dtype) -> None:
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write_ours(ours, dtype)
    _write_megatron(theirs, dtype)
    _same_files(ours, theirs)
    reader = megatron_indexed.IndexedDataset(ours)
    mine = IndexedDataset(ours)
    assert len(reader) == len(mine) == 6
    assert reader.index.dtype == mine.dtype
    numpy.testing.assert_array_equal(reader.document_indices, mine.document_indices)
    numpy.testing.assert_array_equal(reader.sequence_lengths, mine.sequence_lengths)
    for position in range(len(mine)):
        numpy.testing.assert_array_equal(reader[position], mine[position])
        if len(mine[position]) >= 2:
            numpy.testing.assert_array_equal(reader.get(position, 1, 1), mine.get(position, 1, 1))


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32], ids=["uint16", "int32"])
def test_we_read_what_megatron_writes(tmp_path: Path, dtype) -> None:
    prefix = str(tmp_path / "theirs")
    builder = megatron_indexed.IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    for document in DOCUMENTS:  # item by item this time
        for sequence in document:
            builder.add_item(torch.tensor(sequence, dtype=torch.int64))
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    dataset = IndexedDataset(prefix)
    assert dataset.num_documents == len(DOCUMENTS) and dataset.dtype == numpy.dtype(dtype)
    assert [s.tolist() for s in dataset[:]] == [s for d in DOCUMENTS for s in d]
    assert [[s.tolist() for s in dataset.document(i)] for i in range(len(DOCUMENTS))] == DOCUMENTS


def test_merge_matches_megatron_add_index(tmp_path: Path) -> None:
    shards = [DOCUMENTS[:2], DOCUMENTS[2:4], DOCUMENTS[4:]]
    prefixes = []
    for number, documents in enumerate(shards):
        prefixes.append(str(tmp_path / f"shard{number}"))
        _write_megatron(prefixes[-1], numpy.uint16, documents)
    merge_datasets(prefixes, str(tmp_path / "ours"), progress=False)
    theirs = str(tmp_path / "theirs")
    builder = megatron_indexed.IndexedDatasetBuilder(data_file_path(theirs), dtype=numpy.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(index_file_path(theirs))
    _same_files(str(tmp_path / "ours"), theirs)
    reader = megatron_indexed.IndexedDataset(str(tmp_path / "ours"))
    assert [reader[i].tolist() for i in range(len(reader))] == [s for d in DOCUMENTS for s in d]
