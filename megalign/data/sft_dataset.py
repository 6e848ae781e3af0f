"""SFT samples: one conversation per sample, from `megalign preprocess --sft` output.

An SFT dataset is a pair of indexed datasets with identical sequence lengths: PREFIX (token ids)
and PREFIX_loss_mask (uint8, 1 on assistant-reply tokens), one sequence per conversation. Sample i
is one conversation cut or right-padded to seq_length + 1 tokens, as a dict with GPTDataset's keys:

    tokens        int64  the first seq_length tokens
    labels        int64  tokens shifted by one (the next token at each position)
    loss_mask     float32  the mask of the label positions (0 on prompts, headers and padding)
    position_ids  int64  0 .. seq_length - 1

Conversation order: the conversations of the split, permuted with numpy.random.RandomState(seed),
a fresh permutation per epoch from the same generator, for as many epochs as num_samples needs.
build_sft_datasets cuts each prefix into train/valid/test conversation ranges with --split exactly
as build_gpt_datasets does, and blends several prefixes with megalign.data.blended_dataset.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeGuard, Union, cast

import numpy
import torch

from megalign.config.data_paths import parse_data_path
from megalign.data.blended_dataset import BlendedDataset, normalize
from megalign.data.dataset_builder import _check_sizes, document_ranges, samples_per_dataset
from megalign.data.gpt_dataset import Blend, GPTDatasetConfig, Split
from megalign.data.index_cache import description_hash, split_description
from megalign.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megalign.data.sft import loss_mask_prefix
from megalign.errors import ConfigError, DataFormatError

logger = logging.getLogger(__name__)

SFTSplitDataset = Union["SFTDataset", BlendedDataset["SFTDataset"]]
_SEED_MAX = 2**32 - 1
_CHECK_CHUNK = 1 << 24  # mask values validated per step


def _is_int(value: object) -> TypeGuard[Union[int, numpy.integer]]:
    return isinstance(value, (int, numpy.integer)) and not isinstance(value, bool)


def open_sft_pair(path_prefix: str) -> Tuple[IndexedDataset, IndexedDataset]:
    """Open and cross-check PREFIX and PREFIX_loss_mask (DataFormatError naming both on a mismatch)."""
    mask_prefix = loss_mask_prefix(path_prefix)
    for path in (index_file_path(mask_prefix), data_file_path(mask_prefix)):
        if not os.path.isfile(path) and os.path.isfile(index_file_path(path_prefix)):
            raise DataFormatError(
                f"{path}: file not found; the SFT dataset {path_prefix} needs its loss mask "
                f"{mask_prefix}.{{bin,idx}} (written by megalign preprocess --sft)"
            )
    tokens, mask = IndexedDataset(path_prefix), IndexedDataset(mask_prefix)
    both = f"{tokens.idx_path} and {mask.idx_path}"
    if mask.dtype != numpy.uint8:
        raise DataFormatError(f"{mask.idx_path}: a loss mask must hold uint8 values, found {mask.dtype.name}")
    if len(tokens) != len(mask):
        raise DataFormatError(
            f"{both} do not belong together: {len(tokens)} vs {len(mask)} sequences; re-run megalign preprocess --sft"
        )
    if not numpy.array_equal(tokens.sequence_lengths, mask.sequence_lengths):
        at = int(numpy.flatnonzero(tokens.sequence_lengths != mask.sequence_lengths)[0])
        raise DataFormatError(
            f"{both} do not belong together: sequence {at} has {int(tokens.sequence_lengths[at])} tokens but "
            f"{int(mask.sequence_lengths[at])} mask values; re-run megalign preprocess --sft"
        )
    if not numpy.array_equal(tokens.document_indices, numpy.arange(len(tokens) + 1)):
        raise DataFormatError(
            f"{tokens.idx_path}: not an SFT dataset (each document must be one conversation, "
            "one sequence); write it with megalign preprocess --sft"
        )
    if not numpy.array_equal(mask.document_indices, tokens.document_indices):
        raise DataFormatError(f"{both} do not belong together: their document boundaries differ")
    values = numpy.asarray(numpy.memmap(mask.bin_path, dtype=numpy.uint8, mode="r")) if mask.num_tokens else None
    for low in range(0, mask.num_tokens, _CHECK_CHUNK):
        if int(values[low : low + _CHECK_CHUNK].max()) > 1:  # type: ignore[index]
            raise DataFormatError(f"{mask.bin_path}: loss mask values must be 0 or 1; re-run megalign preprocess --sft")
    return tokens, mask


class SFTDataset(torch.utils.data.Dataset):
    """Samples of one conversation each over conversations [begin, end) of an SFT dataset pair.

    num_samples None: one epoch; otherwise exactly num_samples samples (len() == num_samples),
    reusing conversations in later epochs. pad_token None pads with eod_token (padding is never
    trained on). num_truncated counts the conversations of the range longer than seq_length + 1
    tokens, num_without_loss those whose trained tokens all lie beyond the cut.
    """

    def __init__(
        self,
        path_prefix: str,
        document_range: Optional[Tuple[int, int]] = None,
        num_samples: Optional[int] = None,
        index_split: Split = Split.train,
        *,
        seq_length: int,
        seed: int,
        eod_token: int,
        pad_token: Optional[int] = None,
        pair: Optional[Tuple[IndexedDataset, IndexedDataset]] = None,
    ) -> None:
        if not _is_int(seq_length) or seq_length < 1:
            raise ConfigError(f"seq_length: must be a positive integer, got {seq_length!r}")
        if not _is_int(seed) or not 0 <= seed <= _SEED_MAX:
            raise ConfigError(f"seed: must be an integer in [0, 2**32 - 1], got {seed!r}")
        if not _is_int(eod_token) or eod_token < 0:
            raise ConfigError(f"eod_token: must be the tokenizer's end-of-document id, got {eod_token!r}")
        if pad_token is not None and (not _is_int(pad_token) or pad_token < 0):
            raise ConfigError(f"pad_token: must be a non-negative integer or None, got {pad_token!r}")
        if num_samples is not None and (not _is_int(num_samples) or num_samples < 0):
            raise ConfigError(f"num_samples: must be a non-negative integer or None, got {num_samples!r}")
        self.dataset_path = str(path_prefix)
        self.tokens, self.loss_masks = pair if pair is not None else open_sft_pair(self.dataset_path)
        count = len(self.tokens)
        begin, end = (0, count) if document_range is None else (int(document_range[0]), int(document_range[1]))
        if not 0 <= begin <= end <= count:
            raise ConfigError(
                f"document_range: [{begin}, {end}) is not inside the {count} conversations of {path_prefix}"
            )
        if begin == end and num_samples:
            raise ConfigError(
                f"split: the {index_split.name} split of {path_prefix} (conversations [{begin}, {end})) is empty but "
                f"{num_samples} samples were requested; give it a larger share in --split or add data"
            )
        self.document_range = (begin, end)
        self.index_split = index_split
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.pad_token = int(eod_token if pad_token is None else pad_token)
        self.num_samples = (end - begin) if num_samples is None else int(num_samples)
        self.num_conversations = end - begin
        self.sample_index = self._sample_order()
        self._count_truncated()
        self.description: Dict[str, Any] = {
            **split_description(self, self.dataset_path, index_split.name, (begin, end), self.num_samples),
            "seed": self.seed,
            "seq_length": self.seq_length,
            "pad_token": self.pad_token,
            "num_tokens": int(self.tokens.num_tokens),
        }
        self.unique_description_hash = description_hash(self.description)

    def _sample_order(self) -> numpy.ndarray:
        """Conversation index of every sample: one RandomState(seed) permutation of the range per epoch."""
        begin, end = self.document_range
        size = end - begin
        dtype = numpy.int32 if end < 2**31 else numpy.int64
        if size == 0 or self.num_samples == 0:
            return numpy.empty(0, dtype=dtype)
        generator = numpy.random.RandomState(self.seed)
        epochs = math.ceil(self.num_samples / size)
        order = numpy.concatenate([generator.permutation(size) for _ in range(epochs)])[: self.num_samples]
        return (order + begin).astype(dtype)

    def _count_truncated(self) -> None:
        begin, end = self.document_range
        window = self.seq_length + 1
        lengths = self.tokens.sequence_lengths[begin:end]
        long = numpy.flatnonzero(lengths > window) + begin
        self.num_truncated = int(long.size)
        self.num_without_loss = sum(1 for index in long.tolist() if not self.loss_masks.get(index, 1, window - 1).any())
        if self.num_truncated:
            logger.warning(
                "%s (%s split): %d of %d conversations are longer than seq_length + 1 = %d tokens and are cut "
                "(%d of them keep no trained token)",
                self.dataset_path,
                self.index_split.name,
                self.num_truncated,
                self.num_conversations,
                window,
                self.num_without_loss,
            )

    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        if not _is_int(idx):
            raise TypeError(f"sample index must be an integer, got {type(idx).__name__}")
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self!r}")
        conversation = int(self.sample_index[idx])
        window = self.seq_length + 1
        length = min(int(self.tokens.sequence_lengths[conversation]), window)
        ids = numpy.full(window, self.pad_token, dtype=numpy.int64)
        ids[:length] = self.tokens.get(conversation, 0, length)
        mask = numpy.zeros(window, dtype=numpy.float32)
        mask[:length] = self.loss_masks.get(conversation, 0, length)
        return {
            "tokens": torch.from_numpy(ids[:-1].copy()),
            "labels": torch.from_numpy(ids[1:].copy()),
            "loss_mask": torch.from_numpy(mask[1:].copy()),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return (
            f"SFTDataset({self.dataset_path!r}, split={self.index_split.name}, conversations={self.document_range}, "
            f"samples={len(self)}, seq={self.seq_length})"
        )


def truncation_counts(dataset: Optional[SFTSplitDataset]) -> Tuple[int, int, int]:
    """(truncated, without any trained token, total) conversations of an SFT split (or a blend of them)."""
    if dataset is None:
        return 0, 0, 0
    members = dataset.datasets if isinstance(dataset, BlendedDataset) else [dataset]
    return (
        sum(member.num_truncated for member in members),
        sum(member.num_without_loss for member in members),
        sum(member.num_conversations for member in members),
    )


def _as_blend(prefixes_or_blend: Union[str, Sequence[str], Blend]) -> Blend:
    """A prefix, --data-path values (prefixes, or W1 P1 W2 P2 pairs), or (prefixes, weights) -> Blend."""
    if isinstance(prefixes_or_blend, str):
        return parse_data_path([prefixes_or_blend])
    values = list(prefixes_or_blend)
    if len(values) == 2 and isinstance(values[0], (list, tuple)):  # (prefixes, weights or None)
        prefixes, weights = cast(Tuple[Sequence[str], Optional[Sequence[float]]], values)
        return list(prefixes), (None if weights is None else list(weights))
    return parse_data_path(cast(List[str], values))  # --data-path values


def build_sft_datasets(
    prefixes_or_blend: Union[str, Sequence[str], Blend],
    split: str,
    sizes: Sequence[Optional[int]],
    seq_length: int,
    seed: int,
    pad_token: Optional[int],
    eod_token: int,
    *,
    mid_level_dataset_surplus: float = 0.005,
) -> List[Optional[SFTSplitDataset]]:
    """[train, valid, test] SFT datasets (None for a split without conversations).

    prefixes_or_blend: one SFT tokens prefix (P, as written by preprocess --sft: OUT_sft_document),
    --data-path values (several prefixes, or W1 P1 W2 P2 ...), or (prefixes, weights or None).
    Each prefix's conversations are cut by `split` ("969,30,1") as build_gpt_datasets cuts
    sequences. Several prefixes are blended by weight (without weights: by their conversation
    counts) with BlendedDataset; sizes are the samples per split (None: one epoch; a weighted
    blend needs a number). A split with a share but no conversations and a size > 0 is a ConfigError.
    """
    blend = _as_blend(prefixes_or_blend)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        eod_token=eod_token,
        pad_token=pad_token,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
    )  # validates blend and split
    sizes = _check_sizes(sizes)
    prefixes, weights = blend
    pairs = [open_sft_pair(prefix) for prefix in prefixes]
    ranges = [document_ranges(len(tokens), config.split_matrix or []) for tokens, _ in pairs]

    def member(which: int, split_: Split, num_samples: Optional[int]) -> "SFTDataset":
        return SFTDataset(
            prefixes[which],
            ranges[which][split_.value],
            num_samples,
            split_,
            seq_length=seq_length,
            seed=seed,
            eod_token=eod_token,
            pad_token=pad_token,
            pair=pairs[which],
        )

    datasets: List[Optional[SFTSplitDataset]] = [None] * len(Split)
    for split_ in Split:
        size = sizes[split_.value]
        spans = [r[split_.value] for r in ranges]
        if all(span is None for span in spans):
            continue
        # All prefixes are cut by the one split matrix: a split has a range in every prefix or in none.
        counts = [end - begin for begin, end in cast(List[Tuple[int, int]], spans)]
        if weights is not None and size is None:
            raise ConfigError(f"sizes: the {split_.name} split blends weighted datasets, which needs a sample count")
        chosen = [i for i, count in enumerate(counts) if weights is not None or count > 0]
        if not chosen:
            if size:
                member(0, split_, size)  # raises the ConfigError naming the empty split
            continue
        if len(chosen) == 1 and weights is None:
            datasets[split_.value] = member(chosen[0], split_, size)
            continue
        shares = weights if weights is not None else [counts[i] for i in chosen]
        if size is None:  # unweighted, one epoch of each: exhaustive blend of their conversation counts
            members = [member(i, split_, None) for i in chosen]
            datasets[split_.value] = BlendedDataset(members, [len(m) for m in members], None, config)
            continue
        fractions = normalize(shares)
        buffers = samples_per_dataset(fractions, [size], mid_level_dataset_surplus)
        members = [member(i, split_, buffers[k][0]) for k, i in enumerate(chosen)]
        datasets[split_.value] = BlendedDataset(members, fractions, size, config)
    return datasets


__all__ = ["SFTDataset", "build_sft_datasets", "open_sft_pair", "truncation_counts"]
