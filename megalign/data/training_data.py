"""The train and valid datasets of a training run, built from its data section.

Pre-training packs documents into --seq-length samples (GPTDataset, blended by --data-path weights and cut
by --split); with --sft each sample is one conversation from `preprocess --sft` output, padded or truncated,
with the loss on the assistant replies only; with --mock-data the samples are synthetic (megalign.data.mock_dataset).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from megalign.config.data_paths import parse_data_path
from megalign.config.sections import DataSection
from megalign.data.tokenizers import Tokenizer
from megalign.errors import ConfigError

__all__ = ["build_training_datasets"]


def build_training_datasets(
    data: DataSection,
    *,
    seq_length: int,
    seed: int,
    sft: bool,
    sizes: Sequence[int],
    tokenizer: Tokenizer,
    log: Callable[[str], None],
) -> Tuple[Any, Optional[Any]]:
    """(train, valid) with at least ``sizes`` = [train, valid, test] samples; valid is None when
    ``sizes[1]`` is 0. ConfigError when --split leaves a needed split without documents."""
    build = _mock_datasets if data.mock_data else _sft_datasets if sft else _gpt_datasets
    train, valid = build(data, seq_length, seed, list(sizes), tokenizer, log)
    if train is None:
        raise ConfigError(f"--split {data.split} leaves no documents for training; give the train part a share")
    if sizes[1] > 0 and valid is None:
        raise ConfigError(
            f"--split {data.split} leaves no documents for validation; give the valid part a "
            "share, or set --eval-iters 0 to train without evaluation"
        )
    log(f"datasets: train {len(train)} samples" + (f", valid {len(valid)} samples" if valid else ""))
    return train, (valid if sizes[1] > 0 else None)


def _data_path(data: DataSection) -> List[str]:
    if data.data_path is None:
        raise ConfigError("--data-path is required for training (prefixes written by `megalign preprocess`)")
    return data.data_path


def _mock_datasets(
    data: DataSection, seq_length: int, seed: int, sizes: List[int], tokenizer: Tokenizer, log: Callable[[str], None]
) -> Tuple[Any, Any]:
    """--mock-data: Megatron's synthetic documents, packed into --seq-length samples (no files)."""
    from megalign.data.mock_dataset import build_mock_datasets

    log("data: --mock-data, synthetic documents (no --data-path)")
    train, valid, _ = build_mock_datasets(
        data.split, sizes, seq_length, tokenizer.vocab_size, tokenizer.eod, data.eod_mask_loss
    )
    return train, valid


def _gpt_datasets(
    data: DataSection, seq_length: int, seed: int, sizes: List[int], tokenizer: Tokenizer, log: Callable[[str], None]
) -> Tuple[Any, Any]:
    """Pre-training: documents packed into --seq-length samples (GPTDataset, blended by weight)."""
    from megalign.data.dataset_builder import build_gpt_datasets
    from megalign.data.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parse_data_path(_data_path(data)),
        split=data.split,
        path_to_cache=data.data_cache_path,
        eod_token=tokenizer.eod,
        pad_token=tokenizer.pad,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
    )
    train, valid, _ = build_gpt_datasets(config, sizes)
    return train, valid


def _sft_datasets(
    data: DataSection, seq_length: int, seed: int, sizes: List[int], tokenizer: Tokenizer, log: Callable[[str], None]
) -> Tuple[Any, Any]:
    """--sft: one conversation per sample, padded or truncated, loss on the assistant replies only."""
    from megalign.data.sft_dataset import build_sft_datasets, truncation_counts

    train, valid, _ = build_sft_datasets(
        _data_path(data), data.split, sizes, seq_length, seed, tokenizer.pad, tokenizer.eod
    )
    truncated, without_loss, total = truncation_counts(train)
    if truncated:
        log(
            f"warning: {truncated} of {total} training conversations are longer than --seq-length {seq_length} "
            f"and were truncated ({without_loss} lost every reply token)"
        )
    return train, valid
