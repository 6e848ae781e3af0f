"""Build the train/valid/test GPT datasets from `--data-path`, `--split` and per-split sample counts.

Follows megatron-core 0.16.1's BlendedMegatronDatasetBuilder, so the same flags give the same
datasets (and the same sample order) in both:

* `--data-path P` (or several prefixes without weights): one GPTDataset per split of each prefix;
  several prefixes are blended in proportion to their sizes.
* `--data-path W1 P1 W2 P2 ...`: each prefix's split is built with
  ceil(ceil(size * w) * (1 + mid_level_dataset_surplus)) samples (the 0.5% margin) and blended to
  sum(ceil(size * w)) samples.
* `--split 969,30,1`: each prefix's sequences are cut into consecutive train/valid/test ranges
  at round(fraction * number of sequences).
* blend_per_split (`--train-data-path` etc.): each split has its own blend.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

from megalign.config.data_paths import Blend, SplitMatrix
from megalign.data.blended_dataset import BlendedDataset, normalize
from megalign.data.gpt_dataset import GPTDataset, GPTDatasetConfig, Split
from megalign.data.index_cache import IndexCache
from megalign.data.indexed_dataset import IndexedDataset
from megalign.errors import ConfigError

TopLevelDataset = Union[GPTDataset, BlendedDataset[GPTDataset]]


def document_ranges(num_sequences: int, matrix: SplitMatrix) -> List[Optional[Tuple[int, int]]]:
    """The sequence range of each split: [round(begin * n), round(end * n)) (Python's rounding)."""
    return [
        None
        if bookends is None
        else (int(round(bookends[0] * float(num_sequences))), int(round(bookends[1] * float(num_sequences))))
        for bookends in matrix
    ]


def samples_per_dataset(
    weights: Sequence[float], sizes: Sequence[Optional[int]], surplus: float = 0.0
) -> List[List[Optional[int]]]:
    """Samples to request from each dataset for each split: ceil(ceil(size * w) * (1 + surplus))."""
    return [
        [None if size is None else int(math.ceil(math.ceil(size * weight) * (1 + surplus))) for size in sizes]
        for weight in weights
    ]


def _check_sizes(sizes: Sequence[Optional[int]]) -> List[Optional[int]]:
    if len(sizes) != len(Split):
        raise ConfigError(
            f"sizes: need {len(Split)} sample counts (train, valid, test; None = one epoch), got {list(sizes)}"
        )
    for split, size in zip(Split, sizes):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ConfigError(
                f"sizes: the {split.name} sample count must be a non-negative integer or None, got {size!r}"
            )
    return list(sizes)


class GPTDatasetBuilder:
    """Builds [train, valid, test] (each a GPTDataset, a BlendedDataset or None) from a config.

    sizes are the samples each split must provide (None: one epoch of its data), e.g. megatron's
    [train_iters * global_batch, eval_iters * global_batch * (train_iters // eval_interval + 1),
    eval_iters * global_batch]. With torch.distributed initialized every rank must call build().
    """

    def __init__(
        self, config: GPTDatasetConfig, sizes: Sequence[Optional[int]], cache: Optional[IndexCache] = None
    ) -> None:
        self.config = config
        self.sizes = _check_sizes(sizes)
        self.cache = cache
        self._opened: Dict[str, IndexedDataset] = {}
        blends = [config.blend] * len(Split) if config.blend is not None else list(config.blend_per_split or [])
        for split, size, blend in zip(Split, self.sizes, blends):
            if blend is not None and size is None and blend[1] is not None:
                raise ConfigError(
                    f"sizes: the {split.name} split blends weighted datasets, which needs a sample count (got None)"
                )

    def build(self) -> List[Optional[TopLevelDataset]]:
        """The three split datasets."""
        if self.config.blend is not None:
            return self._build_shared_blend(self.config.blend)
        datasets: List[Optional[TopLevelDataset]] = [None] * len(Split)
        for split, blend in zip(Split, self.config.blend_per_split or []):
            if blend is not None:
                datasets[split.value] = self._build_split_blend(split, blend)
        return datasets

    def _open(self, prefix: str) -> IndexedDataset:
        if prefix not in self._opened:
            self._opened[prefix] = IndexedDataset(prefix)
        return self._opened[prefix]

    def _splits_of(
        self, prefix: str, matrix: SplitMatrix, sizes: Sequence[Optional[int]]
    ) -> List[Optional[GPTDataset]]:
        """One GPTDataset per split whose book-ends are not None."""
        dataset = self._open(prefix)
        ranges = document_ranges(len(dataset.sequence_lengths), matrix)
        return [
            None
            if document_range is None
            else GPTDataset(dataset, prefix, document_range, sizes[split.value], split, self.config, self.cache)
            for split, document_range in zip(Split, ranges)
        ]

    def _blend(
        self,
        split: Split,
        datasets: List[GPTDataset],
        weights: Optional[List[float]],
        size: Optional[int],
        target_sizes: Optional[List[int]],
    ) -> BlendedDataset[GPTDataset]:
        if weights is not None:
            # client weights and size: blend exactly the planned (pre-surplus) sample counts
            return BlendedDataset(datasets, weights, sum(target_sizes or []), self.config, self.cache)
        lengths = [len(dataset) for dataset in datasets]
        blended_size = None if size is None else min(size, sum(lengths))
        return BlendedDataset(datasets, lengths, blended_size, self.config, self.cache)

    def _build_shared_blend(self, blend: Blend) -> List[Optional[TopLevelDataset]]:
        prefixes, weights = blend
        matrix = self.config.split_matrix or []
        if weights is not None:
            weights = normalize(weights)
        if len(prefixes) == 1 and weights is None:
            return list(self._splits_of(prefixes[0], matrix, self.sizes))
        if weights is None:
            buffer_sizes: List[List[Optional[int]]] = [[None] * len(Split) for _ in prefixes]
            targets: List[List[Optional[int]]] = buffer_sizes
        else:
            targets = samples_per_dataset(weights, self.sizes)
            buffer_sizes = samples_per_dataset(weights, self.sizes, self.config.mid_level_dataset_surplus)
        per_prefix = [self._splits_of(prefix, matrix, buffer_sizes[i]) for i, prefix in enumerate(prefixes)]
        datasets: List[Optional[TopLevelDataset]] = [None] * len(Split)
        for split in Split:
            if matrix[split.value] is None:
                continue
            members = [splits[split.value] for splits in per_prefix]
            split_targets = [int(t[split.value]) for t in targets] if weights is not None else None  # type: ignore[arg-type]
            datasets[split.value] = self._blend(split, members, weights, self.sizes[split.value], split_targets)  # type: ignore[arg-type]
        return datasets

    def _build_split_blend(self, split: Split, blend: Blend) -> TopLevelDataset:
        prefixes, weights = blend
        matrix: SplitMatrix = [None] * len(Split)
        matrix[split.value] = (0.0, 1.0)
        sizes: List[Optional[int]] = [0] * len(Split)
        sizes[split.value] = self.sizes[split.value]
        if weights is not None:
            weights = normalize(weights)
        if len(prefixes) == 1:
            return self._splits_of(prefixes[0], matrix, sizes)[split.value]  # type: ignore[return-value]
        if weights is None:
            buffer_sizes: List[List[Optional[int]]] = [[None] * len(Split) for _ in prefixes]
            split_targets = None
        else:
            buffer_sizes = samples_per_dataset(weights, sizes, self.config.mid_level_dataset_surplus)
            split_targets = [int(t[split.value]) for t in samples_per_dataset(weights, sizes)]  # type: ignore[arg-type]
        members = [self._splits_of(prefix, matrix, buffer_sizes[i])[split.value] for i, prefix in enumerate(prefixes)]
        return self._blend(split, members, weights, self.sizes[split.value], split_targets)  # type: ignore[arg-type]


def build_gpt_datasets(
    config: GPTDatasetConfig, sizes: Sequence[Optional[int]], cache: Optional[IndexCache] = None
) -> List[Optional[TopLevelDataset]]:
    """[train, valid, test] datasets for `config` (see GPTDatasetBuilder)."""
    return GPTDatasetBuilder(config, sizes, cache).build()
