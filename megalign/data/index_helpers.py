"""Typed wrappers over the C++ dataset-index extension `megalign._helpers` (csrc/helpers.cpp).

The extension computes megatron-core's GPT and blended dataset indices bit for bit (see
docs/datasets.md); these wrappers check argument types, dtypes and ranges first, so a mistake gives
a clear Python error instead of undefined behaviour in C++.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Optional, Sequence, Tuple, TypedDict

import numpy

_EXTENSION: Optional[ModuleType] = None
_UINT32_SEED_MAX = 2**32 - 1


def extension() -> ModuleType:
    """The compiled `megalign._helpers` module; ImportError with the fix when it is not built."""
    global _EXTENSION
    if _EXTENSION is None:
        try:
            _EXTENSION = importlib.import_module("megalign._helpers")
        except ImportError as error:
            raise ImportError(
                "megalign's C++ dataset-index extension (megalign._helpers, built from csrc/helpers.cpp) is not "
                "available: run `pip install -e .` (or `make install`) in the megalign repository to build it "
                f"({error})"
            ) from error
    return _EXTENSION


def _int(value: object, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int32_vector(values: numpy.ndarray, name: str) -> numpy.ndarray:
    if not isinstance(values, numpy.ndarray) or values.ndim != 1 or values.dtype != numpy.int32:
        got = (
            f"{values.dtype} array of shape {values.shape}"
            if isinstance(values, numpy.ndarray)
            else type(values).__name__
        )
        raise TypeError(f"{name} must be a 1-D int32 numpy array, got {got}")
    # Contiguous input is used in place (no copy of a memory-mapped index).
    return values if values.flags.c_contiguous else numpy.ascontiguousarray(values)


def _seed(seed: object) -> int:
    seed = _int(seed, "seed")
    if not 0 <= seed <= _UINT32_SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**32 - 1] (numpy.random.RandomState's range), got {seed}")
    return seed


def _document_range(sequence_lengths: numpy.ndarray, begin: int, end: int) -> Tuple[int, int]:
    begin, end = _int(begin, "begin", 0), _int(end, "end", 0)
    if not begin <= end <= len(sequence_lengths):
        raise ValueError(f"document range [{begin}, {end}) is not inside the {len(sequence_lengths)} sequences")
    return begin, end


class _RawSummary(TypedDict):
    """The dict the extension's summarize_lengths returns."""

    tokens: int
    max_length: int
    fingerprint: int


@dataclass(frozen=True)
class LengthSummary:
    """Tokens in a range of sequences, the longest sequence of the dataset, a fingerprint of the range."""

    tokens: int
    max_length: int
    fingerprint: int


def summarize_lengths(sequence_lengths: numpy.ndarray, begin: int, end: int) -> LengthSummary:
    """Sum of sequence_lengths[begin:end], max of all lengths, and a 64-bit hash of the range."""
    lengths = _int32_vector(sequence_lengths, "sequence_lengths")
    begin, end = _document_range(lengths, begin, end)
    summary: _RawSummary = extension().summarize_lengths(lengths, begin, end)
    return LengthSummary(int(summary["tokens"]), int(summary["max_length"]), int(summary["fingerprint"]))


class _RawPlan(TypedDict):
    """The dict the extension's plan_gpt returns (plan_to_dict in csrc/helpers.cpp)."""

    tokens_per_epoch: int
    num_samples_requested: int  # -1: none requested (one epoch)
    num_epochs: int
    separate_final_epoch: bool
    num_samples_sans_final_epoch: int
    num_samples: int
    first_shuffle_size: int
    document_index_size: int
    shuffle_index_size: int
    sample_index_int64: bool
    shuffle_index_int64: bool


class _RawIndices(_RawPlan):
    """The dict the extension's build_gpt_indices returns: the plan and the three arrays."""

    document_index: numpy.ndarray
    sample_index: numpy.ndarray
    shuffle_index: numpy.ndarray


@dataclass(frozen=True)
class GPTIndexPlan:
    """What the GPT indices look like, computed from scalars alone (megatron-core's rules).

    num_samples is the number of samples the indices hold (at least the number requested);
    samples [0, first_shuffle_size) and [first_shuffle_size, num_samples) are shuffled separately
    when the final epoch is separate.
    """

    tokens_per_epoch: int
    num_samples_requested: Optional[int]
    num_epochs: int
    separate_final_epoch: bool
    num_samples_sans_final_epoch: int
    num_samples: int
    first_shuffle_size: int
    document_index_size: int
    shuffle_index_size: int
    sample_index_dtype: numpy.dtype
    shuffle_index_dtype: numpy.dtype

    @classmethod
    def _from_extension(cls, raw: _RawPlan) -> "GPTIndexPlan":
        requested = int(raw["num_samples_requested"])
        return cls(
            tokens_per_epoch=int(raw["tokens_per_epoch"]),
            num_samples_requested=None if requested < 0 else requested,
            num_epochs=int(raw["num_epochs"]),
            separate_final_epoch=bool(raw["separate_final_epoch"]),
            num_samples_sans_final_epoch=int(raw["num_samples_sans_final_epoch"]),
            num_samples=int(raw["num_samples"]),
            first_shuffle_size=int(raw["first_shuffle_size"]),
            document_index_size=int(raw["document_index_size"]),
            shuffle_index_size=int(raw["shuffle_index_size"]),
            sample_index_dtype=numpy.dtype(numpy.int64 if raw["sample_index_int64"] else numpy.int32),
            shuffle_index_dtype=numpy.dtype(numpy.int64 if raw["shuffle_index_int64"] else numpy.uint32),
        )


def plan_gpt_indices(
    tokens_per_epoch: int,
    num_samples: Optional[int],
    sequence_length: int,
    num_documents: int,
    max_length: int,
    add_extra_token: bool = True,
    drop_last_partial_sequence: bool = True,
) -> GPTIndexPlan:
    """Epochs, separate-final-epoch decision, sample count and array layout (num_samples None: one epoch)."""
    raw: _RawPlan = extension().plan_gpt(
        _int(tokens_per_epoch, "tokens_per_epoch", 1),
        -1 if num_samples is None else _int(num_samples, "num_samples", 0),
        _int(sequence_length, "sequence_length", 1),
        bool(add_extra_token),
        bool(drop_last_partial_sequence),
        _int(num_documents, "num_documents", 1),
        _int(max_length, "max_length", 0),
    )
    return GPTIndexPlan._from_extension(raw)


@dataclass(frozen=True)
class GPTIndices:
    """The three arrays behind a GPT dataset and the plan they follow."""

    document_index: numpy.ndarray
    sample_index: numpy.ndarray
    shuffle_index: numpy.ndarray
    plan: GPTIndexPlan

    def arrays(self) -> Dict[str, numpy.ndarray]:
        """name -> array, as stored in the index cache."""
        return {
            "document_index": self.document_index,
            "sample_index": self.sample_index,
            "shuffle_index": self.shuffle_index,
        }


def build_gpt_indices(
    sequence_lengths: numpy.ndarray,
    begin: int,
    end: int,
    num_samples: Optional[int],
    sequence_length: int,
    seed: int,
    add_extra_token: bool = True,
    drop_last_partial_sequence: bool = True,
    summary: Optional[LengthSummary] = None,
) -> GPTIndices:
    """Document, sample and shuffle index over sequences [begin, end), equal to megatron-core's GPTDataset.

    num_samples None builds one epoch. `summary` (from summarize_lengths) skips recomputing it.
    """
    lengths = _int32_vector(sequence_lengths, "sequence_lengths")
    begin, end = _document_range(lengths, begin, end)
    if begin == end:
        raise ValueError("build_gpt_indices needs at least one document in [begin, end)")
    if summary is None:
        summary = summarize_lengths(lengths, begin, end)
    if summary.tokens <= 0:
        raise ValueError(f"sequences [{begin}, {end}) hold no tokens")
    raw: _RawIndices = extension().build_gpt_indices(
        lengths,
        begin,
        end,
        -1 if num_samples is None else _int(num_samples, "num_samples", 0),
        _int(sequence_length, "sequence_length", 1),
        bool(add_extra_token),
        bool(drop_last_partial_sequence),
        _seed(seed),
        summary.tokens,
        summary.max_length,
    )
    return GPTIndices(
        raw["document_index"], raw["sample_index"], raw["shuffle_index"], GPTIndexPlan._from_extension(raw)
    )


def build_sample_index(
    sequence_lengths: numpy.ndarray,
    document_index: numpy.ndarray,
    sequence_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token: bool = True,
) -> numpy.ndarray:
    """The (num_samples + 1, 2) sample index over an existing document index (megatron's build_sample_idx)."""
    return extension().build_sample_index(
        _int32_vector(sequence_lengths, "sequence_lengths"),
        _int32_vector(document_index, "document_index"),
        _int(sequence_length, "sequence_length", 1),
        _int(num_epochs, "num_epochs", 1),
        _int(tokens_per_epoch, "tokens_per_epoch", 1),
        bool(drop_last_partial_sequence),
        bool(add_extra_token),
    )


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of length `size` following normalised `weights`."""
    values = numpy.asarray(weights, dtype=numpy.float64)
    if values.ndim != 1 or not 1 <= values.size <= 32767:
        raise ValueError(f"weights must be a flat list of 1 to 32767 numbers, got shape {values.shape}")
    if not numpy.all(numpy.isfinite(values)) or numpy.any(values < 0):
        raise ValueError(f"weights must be finite and non-negative, got {values.tolist()}")
    return extension().build_blending_indices(values, _int(size, "size", 0))


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """Blending indices that take exactly sizes[i] samples from dataset i, interleaved by share."""
    values = numpy.asarray(sizes)
    if values.ndim != 1 or not 1 <= values.size <= 32767 or values.dtype.kind not in "iu":
        raise ValueError(
            f"sizes must be a flat list of 1 to 32767 integers, got {values.dtype} of shape {values.shape}"
        )
    if numpy.any(values < 0):
        raise ValueError(f"sizes must be non-negative, got {values.tolist()}")
    return extension().build_exhaustive_blending_indices(values.astype(numpy.int64))


class LegacyRandomState:
    """numpy.random.RandomState(seed)-compatible generator for shuffles (same permutations, faster)."""

    def __init__(self, seed: int) -> None:
        self._state = extension().LegacyRandomState(_seed(seed))

    def shuffle(self, array: numpy.ndarray) -> None:
        """Shuffle a 1-D contiguous array in place exactly like RandomState.shuffle would."""
        if not isinstance(array, numpy.ndarray) or array.ndim != 1 or not array.flags.c_contiguous:
            raise TypeError("shuffle needs a contiguous 1-D numpy array")
        if not array.flags.writeable:
            raise ValueError("shuffle needs a writeable array")
        self._state.shuffle(array)

    def random_interval(self, maximum: int) -> int:
        """A uniform integer in [0, maximum] (numpy's legacy bounded draw)."""
        return int(self._state.random_interval(_int(maximum, "maximum", 0)))


_INDEX_KINDS = {numpy.dtype(numpy.int32), numpy.dtype(numpy.uint32), numpy.dtype(numpy.int64)}


def _index_array(values: numpy.ndarray, name: str, ndim: int) -> numpy.ndarray:
    if not isinstance(values, numpy.ndarray) or values.ndim != ndim or values.dtype not in _INDEX_KINDS:
        raise TypeError(f"{name} must be a {ndim}-D int32, uint32 or int64 numpy array")
    if not values.flags.c_contiguous or values.dtype.byteorder == ">":
        raise ValueError(f"{name} must be C-contiguous and little-endian")
    return values


class SampleReader:
    """Reads GPT sample i (through shuffle, sample and document index) from a .bin in one C++ call.

    read(i) returns numpy arrays (tokens int64, labels int64, loss_mask float32, position_ids int64,
    segment_ids int64 or None) of length sequence_length, computed like megatron-core's
    GPTDataset.__getitem__: padding with `pad_token` past the data (masked in the loss and replaced by
    0), loss masked on EOD with eod_mask_loss, positions restarting after each EOD with
    reset_position_ids; segment_ids (when requested) count EODs before each token.
    """

    def __init__(
        self,
        bin_path: str,
        dtype_code: int,
        sequence_pointers: numpy.ndarray,
        sequence_lengths: numpy.ndarray,
        document_index: numpy.ndarray,
        sample_index: numpy.ndarray,
        shuffle_index: Optional[numpy.ndarray],
        sequence_length: int,
        eod_token: int,
        pad_token: int = -1,
        add_extra_token: bool = True,
        reset_position_ids: bool = False,
        eod_mask_loss: bool = False,
        segment_ids: bool = False,
    ) -> None:
        if dtype_code not in (1, 2, 3, 4, 5, 8):
            raise ValueError(f"token dtype code {dtype_code} is not an integer dtype (1-5 or 8)")
        if sample_index.ndim != 2 or sample_index.shape[1] != 2:
            raise ValueError(f"sample_index must have shape (num_samples + 1, 2), got {sample_index.shape}")
        self._reader = extension().SampleReader(
            str(bin_path),
            int(dtype_code),
            _index_array(sequence_pointers, "sequence_pointers", 1),
            _int32_vector(sequence_lengths, "sequence_lengths"),
            _index_array(document_index, "document_index", 1),
            _index_array(sample_index, "sample_index", 2),
            None if shuffle_index is None else _index_array(shuffle_index, "shuffle_index", 1),
            _int(sequence_length, "sequence_length", 1),
            bool(add_extra_token),
            _int(pad_token, "pad_token"),
            _int(eod_token, "eod_token"),
            bool(reset_position_ids),
            bool(eod_mask_loss),
            bool(segment_ids),
        )
        self.read = self._reader.read  # bound C++ method: no Python frame per sample

    def __len__(self) -> int:
        return len(self._reader)
