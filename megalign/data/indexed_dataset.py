"""Megatron-compatible memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`, MMIDIDX version 1).

`PREFIX.bin` holds the token ids of every sequence back to back. `PREFIX.idx` is, little-endian:

    9 bytes  magic b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code of the tokens (see DTYPE_CODES)
    u64      sequence count S
    u64      document-boundary count D (= number of documents + 1)
    int32[S] sequence lengths (tokens)
    int64[S] sequence pointers (byte offsets into .bin)
    int64[D] document indices: sequence index where each document starts, then S

Files are byte-identical to those of Megatron-LM's IndexedDatasetBuilder for the same content, so they
move both ways. The reader validates the whole layout on open and raises DataFormatError naming the
file and the mismatch; the builder streams tokens to temporary siblings and only renames them into
place in finalize(). See docs/formats.md.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import shutil
import struct
from types import TracebackType
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Type, Union, overload

import numpy

from megalign.errors import DataFormatError
from megalign.utils.atomic import fsync_dir, temporary_sibling
from megalign.utils.progress import ProgressMeter

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-boundary count: 9 + 8 + 1 + 8 + 8 = 34 bytes
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size

DTYPE_CODES: "dict[int, type]" = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}
_CODE_BY_NAME = {numpy.dtype(kind).name: code for code, kind in DTYPE_CODES.items()}

_REBUILD_HINT = "re-run preprocessing (megalign preprocess) to rebuild the dataset"
_CHUNK = 1 << 22  # index entries validated / written per step (bounded temporaries on huge indices)
_COPY_BYTES = 16 << 20  # chunk size when appending another dataset's .bin
_WRITE_BUFFER = 8 << 20


def best_token_dtype(vocab_size: int) -> numpy.dtype:
    """The token dtype Megatron uses for a vocabulary: uint16 below 65,500 entries, else int32."""
    return numpy.dtype(numpy.uint16 if vocab_size < 65500 else numpy.int32)


def data_file_path(prefix: str) -> str:
    """The token file of a dataset: PREFIX.bin."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """The index file of a dataset: PREFIX.idx."""
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """Whether both PREFIX.bin and PREFIX.idx exist (the builder creates .idx last)."""
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def dtype_code(dtype: Any) -> Tuple[numpy.dtype, int]:
    """Normalise `dtype` (numpy type, dtype or name) to a little-endian numpy.dtype and its MMIDIDX code."""
    try:
        normalised = numpy.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"not a numpy dtype: {dtype!r}") from error
    code = _CODE_BY_NAME.get(normalised.name)
    if code is None:
        names = ", ".join(f"{c} {numpy.dtype(t).name}" for c, t in DTYPE_CODES.items())
        raise ValueError(f"dtype {normalised} cannot be stored in an indexed dataset (supported: {names})")
    return normalised.newbyteorder("<"), code


def _corrupt(path: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{path}: {problem}; the file is corrupt, truncated or not a dataset: {_REBUILD_HINT}")


def _file_size(path: str, prefix: str) -> int:
    if not os.path.exists(path):
        raise DataFormatError(
            f"{path}: file not found (an indexed dataset '{prefix}' needs both {data_file_path(prefix)} and "
            f"{index_file_path(prefix)}); check the path prefix or {_REBUILD_HINT}"
        )
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: not a regular file; check the path prefix '{prefix}'")
    return os.path.getsize(path)


@contextlib.contextmanager
def _readable(path: str) -> Iterator[None]:
    """Turn an OS error while opening or mapping `path` into a DataFormatError naming it."""
    try:
        yield
    except OSError as error:
        raise DataFormatError(f"{path}: cannot read ({error.strerror or error})") from error


def _exclusive_byte_offsets(lengths: numpy.ndarray, carry: int, itemsize: int) -> Tuple[numpy.ndarray, int]:
    """Byte offset of each sequence given the offset `carry` of the first; also the end of the last."""
    ends = numpy.cumsum(lengths, dtype=numpy.int64) * itemsize + carry
    starts = ends - lengths.astype(numpy.int64) * itemsize
    return starts, (int(ends[-1]) if ends.size else carry)


class _Index:
    """The parsed and validated arrays of a .idx file (views over a read-only mmap, nothing copied)."""

    def __init__(self, idx_path: str, prefix: str) -> None:
        self.path = idx_path
        size = _file_size(idx_path, prefix)
        with _readable(idx_path), open(idx_path, "rb") as handle:
            header = handle.read(HEADER_SIZE)
            if not MAGIC.startswith(header[: len(MAGIC)]):
                raise _corrupt(idx_path, f"wrong magic {header[: len(MAGIC)]!r} (expected {MAGIC!r})")
            if len(header) < HEADER_SIZE:
                raise _corrupt(idx_path, f"index is {size} bytes, shorter than its {HEADER_SIZE}-byte header")
            _, version, code, num_sequences, num_boundaries = _HEADER.unpack(header)
            if version != VERSION:
                raise _corrupt(
                    idx_path, f"unknown index version {version} (this reader knows MMIDIDX version {VERSION})"
                )
            if code not in DTYPE_CODES:
                raise _corrupt(idx_path, f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
            expected = HEADER_SIZE + num_sequences * 12 + num_boundaries * 8
            counts = f"its header says {num_sequences} sequences and {num_boundaries} document boundaries"
            if size < expected:
                raise _corrupt(idx_path, f"index is {size} bytes but {counts}, which need {expected} bytes")
            if size > expected:
                extra = size - expected
                what = (
                    "per-sequence modes of a multimodal dataset, which megalign does not read"
                    if extra == num_sequences
                    else "trailing data"
                )
                raise _corrupt(
                    idx_path, f"index is {size} bytes but {counts} ({expected} bytes): {extra} bytes of {what}"
                )
            self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.dtype, self.code = dtype_code(DTYPE_CODES[code])
        offset = HEADER_SIZE
        self.sequence_lengths = numpy.frombuffer(self._mmap, numpy.dtype("<i4"), num_sequences, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = numpy.frombuffer(self._mmap, numpy.dtype("<i8"), num_sequences, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = numpy.frombuffer(self._mmap, numpy.dtype("<i8"), num_boundaries, offset)

    def check_documents(self) -> None:
        """Document indices start at 0, never decrease and end at the sequence count."""
        docs, count = self.document_indices, len(self.sequence_lengths)
        if docs.size == 0:
            raise _corrupt(self.path, "no document indices (expected at least [0, sequence count])")
        if docs[0] != 0:
            raise _corrupt(self.path, f"document indices start at {int(docs[0])}, expected 0")
        if docs[-1] != count:
            raise _corrupt(self.path, f"document indices end at {int(docs[-1])} but there are {count} sequences")
        previous = 0
        for low in range(0, docs.size, _CHUNK):
            chunk = docs[low : low + _CHUNK]
            steps = numpy.diff(chunk, prepend=previous)
            bad = numpy.flatnonzero(steps < 0)
            if bad.size:
                at = low + int(bad[0])
                raise _corrupt(
                    self.path,
                    f"document indices are not monotonic: boundary {at} is {int(docs[at])} after {int(docs[at - 1])}",
                )
            previous = int(chunk[-1])

    def check_layout(self, bin_path: str, bin_size: int) -> None:
        """Lengths are non-negative, pointers are their cumulative byte offsets, and they fill the .bin."""
        itemsize = self.dtype.itemsize
        carry = 0
        for low in range(0, len(self.sequence_lengths), _CHUNK):
            lengths = self.sequence_lengths[low : low + _CHUNK]
            negative = numpy.flatnonzero(lengths < 0)
            if negative.size:
                at = low + int(negative[0])
                raise _corrupt(self.path, f"sequence {at} has negative length {int(lengths[negative[0]])}")
            starts, end = _exclusive_byte_offsets(lengths, carry, itemsize)
            wrong = numpy.flatnonzero(self.sequence_pointers[low : low + _CHUNK] != starts)
            if wrong.size:
                at = low + int(wrong[0])
                raise _corrupt(
                    self.path,
                    f"sequence {at} points to byte {int(self.sequence_pointers[at])} of the .bin but the lengths "
                    f"before it ({self.dtype.name}, {itemsize} bytes per token) put it at byte {int(starts[wrong[0]])}",
                )
            carry = end
        if carry != bin_size:
            raise _corrupt(
                bin_path,
                f"data file is {bin_size} bytes but its index {self.path} describes {carry} bytes "
                f"({carry // itemsize} tokens of {self.dtype.name}): the two files do not belong together",
            )


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/PREFIX.idx; item i is sequence i as a numpy array.

    Opening validates magic, version, dtype, sizes, pointers and document indices (DataFormatError on
    any mismatch). Items are zero-copy views into the mapped .bin.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = str(path_prefix)
        self.idx_path = index_file_path(self.path_prefix)
        self.bin_path = data_file_path(self.path_prefix)
        index = _Index(self.idx_path, self.path_prefix)
        bin_size = _file_size(self.bin_path, self.path_prefix)
        index.check_documents()
        index.check_layout(self.bin_path, bin_size)
        self._index = index
        self.dtype: numpy.dtype = index.dtype
        self.dtype_code: int = index.code
        self.sequence_lengths: numpy.ndarray = index.sequence_lengths
        self.sequence_pointers: numpy.ndarray = index.sequence_pointers
        self.document_indices: numpy.ndarray = index.document_indices
        if bin_size == 0:
            self._tokens = numpy.empty(0, dtype=self.dtype)
        else:
            with _readable(self.bin_path):
                self._tokens = numpy.asarray(numpy.memmap(self.bin_path, dtype=self.dtype, mode="r"))

    def __len__(self) -> int:
        """The number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """The number of documents (each holds zero or more consecutive sequences)."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """The number of tokens in the .bin."""
        return len(self._tokens)

    def _position(self, idx: int) -> int:
        if not isinstance(idx, (int, numpy.integer)) or isinstance(idx, bool):
            raise TypeError(f"sequence index must be an integer, got {type(idx).__name__}")
        count = len(self)
        position = int(idx) + count if idx < 0 else int(idx)
        if not 0 <= position < count:
            raise IndexError(f"sequence {int(idx)} out of range for {self.path_prefix} ({count} sequences)")
        return position

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (to its end when length is None); a view."""
        position = self._position(idx)
        size = int(self.sequence_lengths[position])
        if not 0 <= offset <= size:
            raise IndexError(f"offset {offset} out of range for sequence {position} of length {size}")
        if length is None:
            length = size - offset
        if not 0 <= length <= size - offset:
            raise IndexError(f"length {length} at offset {offset} runs past sequence {position} of length {size}")
        start = int(self.sequence_pointers[position]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    @overload
    def __getitem__(self, idx: int) -> numpy.ndarray: ...

    @overload
    def __getitem__(self, idx: slice) -> List[numpy.ndarray]: ...

    def __getitem__(self, idx: Union[int, slice]) -> Union[numpy.ndarray, List[numpy.ndarray]]:
        """Sequence `idx`, or a list of sequences for a slice."""
        if isinstance(idx, slice):
            return [self.get(position) for position in range(*idx.indices(len(self)))]
        return self.get(idx)

    def document(self, doc: int) -> List[numpy.ndarray]:
        """The sequences of document `doc`."""
        if not -self.num_documents <= doc < self.num_documents:
            raise IndexError(f"document {doc} out of range for {self.path_prefix} ({self.num_documents} documents)")
        doc %= self.num_documents
        return self[int(self.document_indices[doc]) : int(self.document_indices[doc + 1])]

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}  # worker processes reopen the files

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["path_prefix"])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, dtype={self.dtype.name}, documents={self.num_documents}, "
            f"sequences={len(self)}, tokens={self.num_tokens})"
        )


def _as_tokens(tokens: Any, dtype: numpy.dtype, where: str) -> numpy.ndarray:
    """`tokens` as a C-contiguous 1-D array of `dtype`, refusing values the dtype cannot hold."""
    values = numpy.asarray(tokens)
    if values.ndim != 1:
        raise DataFormatError(f"{where}: a sequence must be a 1-D list or array of token ids, got shape {values.shape}")
    if values.size == 0:
        return numpy.empty(0, dtype=dtype)
    if values.dtype == dtype:
        return numpy.ascontiguousarray(values)
    if values.dtype.kind not in "iub" and not (values.dtype.kind == "f" and dtype.kind == "f"):
        raise DataFormatError(f"{where}: token ids must be integers, got {values.dtype} values")
    if dtype.kind in "iu" and not numpy.can_cast(values.dtype, dtype, "safe"):
        low, high = values.min(), values.max()
        limits = numpy.iinfo(dtype)
        if low < limits.min or high > limits.max:
            bad = low if low < limits.min else high
            raise DataFormatError(
                f"{where}: token id {int(bad)} does not fit the dataset dtype {dtype.name} "
                f"[{limits.min}, {limits.max}]; use a wider dtype (best_token_dtype(vocab_size))"
            )
    return numpy.ascontiguousarray(values, dtype=dtype)


def _permissions_from_umask(path: str) -> None:
    """mkstemp creates 0600 files; give the finished dataset the permissions of a normal file."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


class IndexedDatasetBuilder:
    """Writes PREFIX.bin/PREFIX.idx in Megatron's MMIDIDX v1 layout, atomically.

    Tokens stream to a hidden temporary sibling of PREFIX.bin; finalize() writes the index to another
    temporary sibling and renames both into place (.idx last), so nothing at the final paths changes
    before finalize() and a crash never leaves a complete-looking dataset. As a context manager it
    finalizes on success and aborts (removes its temporaries) on an exception.

        with IndexedDatasetBuilder("out/corpus_text_document", best_token_dtype(vocab)) as builder:
            for ids in documents:
                builder.add_document(ids)
    """

    def __init__(self, output_prefix: str, dtype: Any) -> None:
        self.output_prefix = str(output_prefix)
        self.dtype, self.dtype_code = dtype_code(dtype)
        self.bin_path = data_file_path(self.output_prefix)
        self.idx_path = index_file_path(self.output_prefix)
        self._lengths = array.array("i")  # C int: 4 bytes on every Linux ABI
        self._documents = array.array("q", [0])
        self._tmp_bin: Optional[str] = temporary_sibling(self.bin_path)
        self._tmp_idx: Optional[str] = None
        self._file = open(self._tmp_bin, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - closed in finalize/abort
        self._state = "open"

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        """Documents closed so far."""
        return len(self._documents) - 1

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"IndexedDatasetBuilder for {self.output_prefix} is already {self._state}")

    def _write(self, values: numpy.ndarray) -> None:
        if values.size:
            self._file.write(values.data.cast("B"))

    def add_item(self, tokens: Any) -> None:
        """Append one sequence to the current document (close it with end_document())."""
        self._check_open()
        values = _as_tokens(tokens, self.dtype, self.bin_path)
        if values.size > numpy.iinfo(numpy.int32).max:
            raise DataFormatError(f"{self.bin_path}: a sequence of {values.size} tokens exceeds the int32 length field")
        self._write(values)
        self._lengths.append(values.size)

    def end_document(self) -> None:
        """Close the current document (the sequences added since the last boundary; may be none)."""
        self._check_open()
        self._documents.append(len(self._lengths))

    def add_document(self, tokens: Any, lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document: `tokens` split into sequences of `lengths` (one sequence when None)."""
        self._check_open()
        values = _as_tokens(tokens, self.dtype, self.bin_path)
        if lengths is None:  # the common case: the document is one sequence
            self.add_item(values)
            self.end_document()
            return
        sizes = numpy.asarray(lengths, dtype=numpy.int64).reshape(-1)
        if sizes.size and (sizes.min() < 0 or sizes.max() > numpy.iinfo(numpy.int32).max):
            raise DataFormatError(f"{self.bin_path}: sequence lengths must be in [0, 2**31 - 1], got {sizes.tolist()}")
        if int(sizes.sum()) != values.size:
            raise DataFormatError(
                f"{self.bin_path}: document of {values.size} tokens given sequence lengths summing to "
                f"{int(sizes.sum())}"
            )
        self._write(values)
        self._lengths.frombytes(sizes.astype(numpy.int32).tobytes())
        self._documents.append(len(self._lengths))

    def _close_pending_document(self) -> None:
        if len(self._lengths) > self._documents[-1]:
            self._documents.append(len(self._lengths))

    def add_index(self, other_prefix: str) -> None:
        """Append a whole finished dataset: copy its .bin in big chunks and shift its index.

        A document left open by add_item() is closed first, so documents never span datasets.
        """
        self._check_open()
        self.append_dataset(IndexedDataset(other_prefix))

    def append_dataset(self, dataset: IndexedDataset) -> None:
        """add_index() for an already opened (hence validated) dataset."""
        self._check_open()
        if dataset.dtype != self.dtype:
            raise DataFormatError(
                f"{dataset.idx_path}: tokens are {dataset.dtype.name} but {self.bin_path} is being written as "
                f"{self.dtype.name}; datasets can only be merged when their dtypes agree (re-run preprocessing "
                "of one of them with the same tokenizer)"
            )
        self._close_pending_document()
        offset = len(self._lengths)
        self._lengths.frombytes(dataset.sequence_lengths.astype(numpy.int32).tobytes())
        self._documents.frombytes((dataset.document_indices[1:] + offset).astype(numpy.int64).tobytes())
        with open(dataset.bin_path, "rb") as source:
            shutil.copyfileobj(source, self._file, _COPY_BYTES)

    def _write_index(self, path: str) -> None:
        lengths = numpy.frombuffer(self._lengths, dtype=numpy.int32)
        documents = numpy.frombuffer(self._documents, dtype=numpy.int64)
        with open(path, "wb", buffering=_WRITE_BUFFER) as handle:
            handle.write(_HEADER.pack(MAGIC, VERSION, self.dtype_code, len(lengths), len(documents)))
            handle.write(lengths.astype("<i4", copy=False).tobytes())
            carry = 0
            for low in range(0, len(lengths), _CHUNK):
                starts, carry = _exclusive_byte_offsets(lengths[low : low + _CHUNK], carry, self.dtype.itemsize)
                handle.write(starts.astype("<i8", copy=False).tobytes())
            handle.write(documents.astype("<i8", copy=False).tobytes())
            handle.flush()
            os.fsync(handle.fileno())

    def finalize(self) -> None:
        """Close the open document, write the index, and move .bin then .idx into place."""
        self._check_open()
        tmp_bin = self._tmp_bin
        assert tmp_bin is not None  # set in __init__, cleared only once finalized or aborted
        try:
            self._close_pending_document()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            tmp_idx = self._tmp_idx = temporary_sibling(self.idx_path)
            self._write_index(tmp_idx)
            for tmp in (tmp_bin, tmp_idx):
                _permissions_from_umask(tmp)
            # Drop an old index first: between the two renames no complete-looking dataset exists.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.idx_path)
            os.replace(tmp_bin, self.bin_path)
            self._tmp_bin = None
            os.replace(tmp_idx, self.idx_path)
            self._tmp_idx = None
            fsync_dir(os.path.dirname(os.path.abspath(self.idx_path)) or ".")
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Discard everything written; the final paths are left as they were. Safe to call twice."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        with contextlib.suppress(Exception):
            self._file.close()
        for tmp in (self._tmp_bin, self._tmp_idx):
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        self._tmp_bin = self._tmp_idx = None

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def __del__(self) -> None:
        # A builder dropped without finalize() can never complete: remove its temporary files.
        if getattr(self, "_state", None) == "open":
            self.abort()


def merge_datasets(input_prefixes: List[str], output_prefix: str, progress: bool = True) -> None:
    """Concatenate finished datasets, in order, into OUTPUT_PREFIX.bin/.idx (atomic).

    All inputs are opened and validated, and their dtypes compared, before anything is written. The
    result is byte-identical to writing all their documents with one builder.
    """
    if not input_prefixes:
        raise DataFormatError(f"merge into {output_prefix}: no input datasets given")
    datasets = [IndexedDataset(prefix) for prefix in input_prefixes]
    first = datasets[0]
    for dataset in datasets[1:]:
        if dataset.dtype != first.dtype:
            raise DataFormatError(
                f"cannot merge {dataset.idx_path} ({dataset.dtype.name} tokens) with {first.idx_path} "
                f"({first.dtype.name} tokens): all inputs must share one dtype (the same tokenizer); "
                "re-run preprocessing of the odd one out"
            )
    meter = ProgressMeter("merge-datasets", total=len(datasets), unit="datasets", enabled=progress)
    with IndexedDatasetBuilder(output_prefix, first.dtype) as builder:
        for dataset in datasets:
            builder.append_dataset(dataset)
            meter.update(datasets=1, tokens=dataset.num_tokens, bytes=dataset.num_tokens * dataset.dtype.itemsize)
    meter.close()
