"""GPT pre-training samples over an indexed dataset, with megatron-core 0.16.1's exact sample order.

A GPTDataset exposes the sequences [begin, end) of an IndexedDataset (one split of it) as samples
of `sequence_length` tokens. Three index arrays, built by the C++ helpers and cached on disk
(megalign.data.index_cache), define which tokens sample i holds:

    document_index  the sequence ids of every epoch, shuffled (int32)
    sample_index    row k = (position in document_index, token offset) where sample k starts
    shuffle_index   a permutation of the samples (uint32, int64 beyond 2**32 - 2 samples)

They equal megatron-core's for the same data and settings, so a run can switch between megalign
and Megatron-LM without changing the sample order. docs/datasets.md explains the arrays.
"""

from __future__ import annotations

import enum
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeGuard, Union

import numpy
import torch

from megalign.config.data_paths import Blend, parse_split, split_matrix_from_vector
from megalign.data.index_cache import ArraySpec, IndexCache, description_hash, split_description
from megalign.data.index_helpers import (
    GPTIndexPlan,
    SampleReader,
    build_gpt_indices,
    plan_gpt_indices,
    summarize_lengths,
)
from megalign.data.indexed_dataset import IndexedDataset
from megalign.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

_SEED_MAX = 2**32 - 1


class Split(enum.Enum):
    """The three dataset splits, in the order of a "train,valid,test" split string."""

    train = 0
    valid = 1
    test = 2


def _require(condition: Union[bool, numpy.bool_], name: str, message: str) -> None:
    """ConfigError "name: message" unless `condition` (a numpy.bool_ where a numpy integer was compared)."""
    if not condition:
        raise ConfigError(f"{name}: {message}")


def _is_int(value: object) -> TypeGuard[Union[int, numpy.integer]]:
    return isinstance(value, (int, numpy.integer)) and not isinstance(value, bool)


def _check_blend(blend: Any, name: str) -> None:
    _require(isinstance(blend, (tuple, list)) and len(blend) == 2, name, "must be (prefixes, weights or None)")
    prefixes, weights = blend
    _require(
        isinstance(prefixes, (list, tuple)) and len(prefixes) > 0 and all(isinstance(p, str) and p for p in prefixes),
        name,
        f"needs a non-empty list of dataset path prefixes, got {prefixes!r}",
    )
    if weights is not None:
        _require(
            isinstance(weights, (list, tuple)) and len(weights) == len(prefixes),
            name,
            f"has {len(prefixes)} prefixes but weights {weights!r}; give one weight per prefix",
        )
        for weight in weights:
            _require(
                isinstance(weight, (int, float))
                and not isinstance(weight, bool)
                and numpy.isfinite(weight)
                and weight > 0,
                name,
                f"weights must be positive numbers, got {weight!r}",
            )


@dataclass
class GPTDatasetConfig:
    """Settings of GPT datasets (megatron-core's GPTDatasetConfig, minus the tokenizer object).

    blend is (prefixes, weights or None) for train/valid/test drawn from the same data by `split`
    ("969,30,1"); blend_per_split gives one blend (or None) per split instead. Samples carry
    tokens, labels, loss_mask and position_ids; with reset_attention_mask also segment_ids (the
    number of EOD tokens before each position: attention stays within equal segment ids), and with
    create_attention_mask a dense (1, seq, seq) boolean mask, True where attention is not allowed.
    """

    random_seed: int
    sequence_length: int
    blend: Optional[Blend] = None
    blend_per_split: Optional[List[Optional[Blend]]] = None
    split: Optional[str] = None
    path_to_cache: Optional[str] = None
    eod_token: Optional[int] = None
    pad_token: Optional[int] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    add_extra_token_to_sequence: bool = True
    drop_last_partial_validation_sequence: bool = True
    mid_level_dataset_surplus: float = 0.005
    split_matrix: Optional[List[Optional[Tuple[float, float]]]] = field(init=False, default=None)

    def __post_init__(self) -> None:
        _require(
            _is_int(self.random_seed) and 0 <= self.random_seed <= _SEED_MAX,
            "random_seed",
            f"must be an integer in [0, 2**32 - 1], got {self.random_seed!r}",
        )
        _require(
            _is_int(self.sequence_length) and self.sequence_length >= 1,
            "sequence_length",
            f"must be a positive integer, got {self.sequence_length!r}",
        )
        _require(
            _is_int(self.eod_token) and self.eod_token >= 0,
            "eod_token",
            f"must be the tokenizer's end-of-document id (a non-negative integer), got {self.eod_token!r}",
        )
        _require(
            self.pad_token is None or _is_int(self.pad_token),
            "pad_token",
            f"must be an integer or None, got {self.pad_token!r}",
        )
        for name in (
            "reset_position_ids",
            "reset_attention_mask",
            "eod_mask_loss",
            "create_attention_mask",
            "add_extra_token_to_sequence",
            "drop_last_partial_validation_sequence",
        ):
            _require(isinstance(getattr(self, name), bool), name, f"must be True or False, got {getattr(self, name)!r}")
        _require(
            isinstance(self.mid_level_dataset_surplus, (int, float)) and 0 <= self.mid_level_dataset_surplus < 1e6,
            "mid_level_dataset_surplus",
            f"must be a non-negative number, got {self.mid_level_dataset_surplus!r}",
        )
        _require(
            self.path_to_cache is None or (isinstance(self.path_to_cache, str) and self.path_to_cache != ""),
            "path_to_cache",
            "must be a directory path or None",
        )
        self._check_blends()

    def _check_blends(self) -> None:
        if self.blend_per_split is not None and any(blend is not None for blend in self.blend_per_split):
            _require(self.blend is None, "blend", "blend and blend_per_split cannot be used together")
            _require(self.split is None, "split", "split applies to blend, not to blend_per_split; drop it")
            _require(
                len(self.blend_per_split) == len(Split),
                "blend_per_split",
                f"needs {len(Split)} entries (train, valid, test; None for a split without data)",
            )
            for split, blend in zip(Split, self.blend_per_split):
                if blend is not None:
                    _check_blend(blend, f"blend_per_split[{split.name}]")
            return
        _require(self.blend is not None, "blend", "no data: give blend (--data-path) or blend_per_split")
        _check_blend(self.blend, "blend")
        _require(self.split is not None, "split", 'is required with blend, e.g. "969,30,1"')
        self.split_matrix = split_matrix_from_vector(parse_split(self.split))  # type: ignore[arg-type]

    def effective_pad_token(self) -> int:
        """The pad id samples use: pad_token, or -1 (never in the data) when unset or equal to eod_token."""
        if self.pad_token is None:
            return -1
        if self.pad_token == self.eod_token:
            warnings.warn(
                f"pad_token {self.pad_token} equals eod_token: padding is marked with -1 instead, so EOD tokens "
                "in the data keep their loss (give the tokenizer a distinct pad id to silence this)",
                stacklevel=2,
            )
            return -1
        return int(self.pad_token)


def default_cache_directory(dataset_path: str) -> str:
    """Where indices are cached when path_to_cache is unset: DIR_OF_PREFIX/cache/megalign_indices."""
    return os.path.join(os.path.dirname(os.path.abspath(dataset_path)), "cache", "megalign_indices")


def _sample_index_check(document_index_size: int, max_length: int) -> Callable[[numpy.ndarray], Optional[str]]:
    """Cross-column checks of a cached sample index (positions inside the document index, rising)."""

    def check(sample_index: numpy.ndarray) -> Optional[str]:
        positions, offsets = sample_index[:, 0], sample_index[:, 1]
        if int(positions.max()) >= document_index_size:
            return f"sample_index points past the {document_index_size}-entry document index"
        if int(offsets.max()) > max_length:
            return f"sample_index has an offset beyond the longest sequence ({max_length} tokens)"
        if not numpy.all(positions[1:] >= positions[:-1]):
            return "sample_index positions are not non-decreasing"
        return None

    return check


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `config.sequence_length` tokens over sequences [begin, end) of an IndexedDataset.

    num_samples None builds one epoch; otherwise enough epochs for at least num_samples samples
    (len() may be larger, as in megatron-core). Item i is a dict of torch tensors: tokens (int64),
    labels (int64), loss_mask (float32), position_ids (int64), plus segment_ids / attention_mask
    as configured.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str,
        document_range: Tuple[int, int],
        num_samples: Optional[int],
        index_split: Split,
        config: GPTDatasetConfig,
        cache: Optional[IndexCache] = None,
    ) -> None:
        self.indexed_dataset = indexed_dataset
        self.dataset_path = str(dataset_path)
        begin, end = (int(document_range[0]), int(document_range[1]))
        if not 0 <= begin <= end <= len(indexed_dataset):
            raise ConfigError(
                f"document_range: [{begin}, {end}) is not inside the {len(indexed_dataset)} sequences of {dataset_path}"
            )
        if num_samples is not None and (not _is_int(num_samples) or num_samples < 0):
            raise ConfigError(f"num_samples: must be a non-negative integer or None, got {num_samples!r}")
        self.document_range = (begin, end)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.index_split = index_split
        self.config = config
        self._pad_token = config.effective_pad_token()
        self._reader: Optional[SampleReader] = None

        lengths = indexed_dataset.sequence_lengths
        self.summary = summarize_lengths(lengths, begin, end)
        self.drop_last_partial_sequence = index_split != Split.valid or config.drop_last_partial_validation_sequence
        self.description: Dict[str, Any] = {
            **split_description(self, self.dataset_path, index_split.name, (begin, end), self.num_samples),
            "random_seed": int(config.random_seed),
            "sequence_length": int(config.sequence_length),
            "add_extra_token_to_sequence": config.add_extra_token_to_sequence,
            "drop_last_partial_sequence": self.drop_last_partial_sequence,
            "num_sequences": len(lengths),
            "tokens_in_range": self.summary.tokens,
            "max_sequence_length": self.summary.max_length,
            "lengths_fingerprint": f"{self.summary.fingerprint:016x}",
        }
        self.unique_description_hash = description_hash(self.description)
        self.plan: Optional[GPTIndexPlan] = None
        if end == begin or self.summary.tokens == 0:
            if self.num_samples:
                raise ConfigError(
                    f"split: the {index_split.name} split of {dataset_path} (sequences [{begin}, {end}), "
                    f"{self.summary.tokens} tokens) is empty but {self.num_samples} samples were requested; "
                    "give it a larger share in --split or add data"
                )
            self.document_index = numpy.empty(0, dtype=numpy.int32)
            self.sample_index = numpy.zeros((1, 2), dtype=numpy.int32)
            self.shuffle_index = numpy.empty(0, dtype=numpy.uint32)
            return
        self.plan = plan_gpt_indices(
            self.summary.tokens,
            self.num_samples,
            config.sequence_length,
            end - begin,
            self.summary.max_length,
            config.add_extra_token_to_sequence,
            self.drop_last_partial_sequence,
        )
        if cache is None:
            cache = IndexCache(config.path_to_cache or default_cache_directory(self.dataset_path))
        entry = cache.entry(type(self).__name__, index_split.name, self.description, self._specs(self.plan))
        arrays = cache.load_or_build(entry, self._build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _specs(self, plan: GPTIndexPlan) -> List[ArraySpec]:
        begin, end = self.document_range
        return [
            ArraySpec("document_index", numpy.dtype(numpy.int32), (plan.document_index_size,), begin, end),
            ArraySpec(
                "sample_index",
                plan.sample_index_dtype,
                (plan.num_samples + 1, 2),
                0,
                max(plan.document_index_size, self.summary.max_length + 1),
                _sample_index_check(plan.document_index_size, self.summary.max_length),
            ),
            ArraySpec(
                "shuffle_index", plan.shuffle_index_dtype, (plan.shuffle_index_size,), 0, max(plan.num_samples, 1)
            ),
        ]

    def _build(self) -> Dict[str, numpy.ndarray]:
        begin, end = self.document_range
        logger.info(
            "building %s %s indices for %s: %d sequences, %d tokens per epoch, %s epochs",
            type(self).__name__,
            self.index_split.name,
            self.dataset_path,
            end - begin,
            self.summary.tokens,
            self.plan.num_epochs if self.plan else 0,
        )
        indices = build_gpt_indices(
            self.indexed_dataset.sequence_lengths,
            begin,
            end,
            self.num_samples,
            self.config.sequence_length,
            self.config.random_seed,
            self.config.add_extra_token_to_sequence,
            self.drop_last_partial_sequence,
            self.summary,
        )
        return indices.arrays()

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def _open_reader(self) -> SampleReader:
        dataset = self.indexed_dataset
        try:
            self._reader = SampleReader(
                dataset.bin_path,
                dataset.dtype_code,
                dataset.sequence_pointers,
                dataset.sequence_lengths,
                self.document_index,
                self.sample_index,
                self.shuffle_index,
                self.config.sequence_length,
                eod_token=int(self.config.eod_token),  # type: ignore[arg-type]
                pad_token=self._pad_token,
                add_extra_token=self.config.add_extra_token_to_sequence,
                reset_position_ids=self.config.reset_position_ids,
                eod_mask_loss=self.config.eod_mask_loss,
                segment_ids=self.config.reset_attention_mask,
            )
        except (RuntimeError, ValueError) as error:
            raise DataFormatError(f"{dataset.bin_path}: cannot read samples: {error}") from error
        return self._reader

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        reader = self._reader if self._reader is not None else self._open_reader()
        try:
            tokens, labels, loss_mask, position_ids, segment_ids = reader.read(idx)
        except ValueError as error:
            raise DataFormatError(
                f"{self.dataset_path}: sample {idx} of the {self.index_split.name} split: {error}"
            ) from error
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
        }
        if segment_ids is not None:
            sample["segment_ids"] = torch.from_numpy(segment_ids)
        if self.config.create_attention_mask:
            sample["attention_mask"] = dense_attention_mask(sample.get("segment_ids"), self.config.sequence_length)
        return sample

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # a worker process reopens the .bin
        return state

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.dataset_path!r}, split={self.index_split.name}, sequences={self.document_range}, "
            f"samples={len(self)}, seq={self.config.sequence_length})"
        )


def dense_attention_mask(segment_ids: Optional[torch.Tensor], sequence_length: int) -> torch.Tensor:
    """Megatron's (1, seq, seq) boolean mask, True where a query must not attend to a key.

    Causal; with segment ids (reset_attention_mask) also blocked across document boundaries.
    """
    allowed = torch.ones(sequence_length, sequence_length, dtype=torch.bool).tril_()
    if segment_ids is not None:
        allowed &= segment_ids.unsqueeze(1) == segment_ids.unsqueeze(0)
    return (~allowed).unsqueeze(0)
