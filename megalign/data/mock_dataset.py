"""Synthetic training data for --mock-data (Megatron-LM's MockGPTDataset): no files, deterministic tokens.

The documents are Megatron's MockGPTLowLevelDataset's: 100,000 documents whose lengths are drawn once from
``numpy.random.default_rng(0).integers(1, 4096)``; document ``d`` of length ``n`` is the tokens
``1, 2, ..., n - 1`` (modulo the vocabulary) followed by the end-of-document token. --split divides the
documents into train/valid/test ranges; a split's documents are concatenated (cycling when more samples are
asked for than they hold) and cut into consecutive samples of ``seq_length + 1`` tokens overlapping by one,
as GPTDataset packs real documents. Items have GPTDataset's keys and dtypes: tokens and labels (int64, the
labels shifted by one), loss_mask (float32; 0 on end-of-document inputs with --eod-mask-loss) and
position_ids (int64, 0..seq_length-1). The data does not depend on --seed: it is the same in every run.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy
import torch

from megalign.config.data_paths import parse_split
from megalign.errors import ConfigError

__all__ = ["MockGPTDataset", "build_mock_datasets"]

NUM_DOCUMENTS = 100_000  # MockGPTLowLevelDataset.size
MAX_DOCUMENT_LENGTH = 4096  # MockGPTLowLevelDataset.max_sequence_length (exclusive upper bound)


def _document_lengths() -> numpy.ndarray:
    return numpy.random.default_rng(seed=0).integers(1, MAX_DOCUMENT_LENGTH, size=NUM_DOCUMENTS, dtype=numpy.int64)


class MockGPTDataset:
    """``num_samples`` samples of ``seq_length`` tokens from documents ``[first, stop)`` of the mock corpus."""

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        eod: int,
        documents: range,
        eod_mask_loss: bool = False,
    ) -> None:
        if num_samples < 0 or seq_length < 1 or vocab_size < 1 or len(documents) == 0:
            raise ValueError(
                f"MockGPTDataset: num_samples={num_samples}, seq_length={seq_length}, vocab_size={vocab_size} "
                f"and documents={documents} must be >= 0, >= 1, >= 1 and non-empty"
            )
        self.num_samples, self.seq_length, self.vocab_size, self.eod = num_samples, seq_length, vocab_size, eod
        self.eod_mask_loss = eod_mask_loss
        self.lengths = _document_lengths()[documents.start : documents.stop]
        self.ends = numpy.cumsum(self.lengths)  # stream offset after each document
        self.total = int(self.ends[-1])

    def __len__(self) -> int:
        return self.num_samples

    def _stream(self, start: int, count: int) -> numpy.ndarray:
        """``count`` tokens of the split's (cyclic) document stream from offset ``start``."""
        out: List[numpy.ndarray] = []
        position = start % self.total
        while count > 0:
            doc = int(numpy.searchsorted(self.ends, position, side="right"))
            begin = int(self.ends[doc] - self.lengths[doc])
            length = int(self.lengths[doc])
            document = numpy.append((numpy.arange(length - 1, dtype=numpy.int64) + 1) % self.vocab_size, self.eod)
            piece = document[position - begin : position - begin + count]
            out.append(piece)
            count -= len(piece)
            position = (position + len(piece)) % self.total
        return numpy.concatenate(out)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"MockGPTDataset: sample {idx} is out of range (0..{self.num_samples - 1})")
        window = torch.from_numpy(self._stream(idx * self.seq_length, self.seq_length + 1))
        tokens, labels = window[:-1].clone(), window[1:].clone()
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return f"MockGPTDataset(samples={self.num_samples}, seq={self.seq_length}, documents={len(self.lengths)})"


def build_mock_datasets(
    split: str, sizes: List[int], seq_length: int, vocab_size: int, eod: int, eod_mask_loss: bool = False
) -> List[Optional[MockGPTDataset]]:
    """[train, valid, test] mock datasets of ``sizes`` samples (None for an empty split or size 0)."""
    fractions = parse_split(split)
    bounds = [int(round(sum(fractions[:index]) * NUM_DOCUMENTS)) for index in range(len(fractions) + 1)]
    datasets: List[Optional[MockGPTDataset]] = []
    for index, size in enumerate(sizes):
        documents = range(bounds[index], bounds[index + 1])
        if size > 0 and len(documents) == 0:
            raise ConfigError(f"--split {split} leaves no mock documents for split {index} ({size} samples asked)")
        datasets.append(
            MockGPTDataset(size, seq_length, vocab_size, eod, documents, eod_mask_loss) if size > 0 else None
        )
    return datasets
