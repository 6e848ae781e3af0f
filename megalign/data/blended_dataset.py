"""A weighted blend of GPT datasets with megatron-core 0.16.1's exact interleaving.

Two cached arrays define the blend:

    dataset_index         (int16) which dataset sample i comes from
    dataset_sample_index  (int64) which sample of that dataset

Built greedily: position i goes to the dataset whose drawn count lags its weight's share the
most (build_blending_indices). With size None each dataset contributes exactly `weights[i]`
samples (integers), interleaved in proportion (build_exhaustive_blending_indices).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Generic, List, Optional, Protocol, Sequence, TypeVar, Union

import numpy
import torch

from megalign.data.gpt_dataset import GPTDatasetConfig, Split
from megalign.data.index_cache import ArraySpec, EntryCheck, IndexCache, description_hash, validate_arrays
from megalign.data.index_helpers import build_blending_indices, build_exhaustive_blending_indices
from megalign.errors import ConfigError

logger = logging.getLogger(__name__)


def normalize(weights: Sequence[float]) -> List[float]:
    """Weights divided by their sum, in float64 exactly as megatron-core does it."""
    values = numpy.array(weights, dtype=numpy.float64)
    return (values / numpy.sum(values)).tolist()


def _oversampling_check(lengths: Sequence[int]) -> EntryCheck:
    """A check that no blend position asks a dataset for a sample it does not have."""
    limits = numpy.asarray(lengths, dtype=numpy.int64)

    def check(arrays: Dict[str, numpy.ndarray]) -> Optional[str]:
        dataset_index, sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        if dataset_index.size == 0:
            return None
        counts = numpy.bincount(dataset_index.astype(numpy.int64), minlength=len(limits))
        for which, wanted in enumerate(counts.tolist()):
            if wanted > limits[which]:
                return (
                    f"the blend requests {wanted} samples from dataset {which}, which has {int(limits[which])}; "
                    f"{_SURPLUS_HINT}"
                )
        if numpy.any(sample_index >= limits[dataset_index.astype(numpy.int64)]):
            return "dataset_sample_index points past the end of a dataset"
        return None

    return check


class BlendMember(Protocol):
    """What BlendedDataset needs of the datasets it blends (GPTDataset, SFTDataset)."""

    @property
    def index_split(self) -> Split: ...

    @property
    def dataset_path(self) -> str: ...

    @property
    def unique_description_hash(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]: ...


_Member = TypeVar("_Member", bound=BlendMember)


class BlendedDataset(torch.utils.data.Dataset, Generic[_Member]):
    """Samples drawn from several GPTDatasets (or SFTDatasets) of one split in proportion to `weights`.

    size None: weights are integer sample counts and the blend takes exactly that many from each
    dataset. Otherwise the weights are normalised and `size` samples are blended. Item i is the
    dataset's sample plus "dataset_id".
    """

    def __init__(
        self,
        datasets: Sequence[_Member],
        weights: Sequence[Union[int, float]],
        size: Optional[int],
        config: GPTDatasetConfig,
        cache: Optional[IndexCache] = None,
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ConfigError(
                f"blend: {len(datasets)} datasets but {len(weights)} weights; give one weight per dataset"
            )
        if len(datasets) >= 32767:
            raise ConfigError(f"blend: {len(datasets)} datasets; at most 32766 can be blended (int16 dataset ids)")
        splits = {dataset.index_split for dataset in datasets}
        if len(splits) != 1:
            raise ConfigError(f"blend: datasets of different splits {sorted(s.name for s in splits)} cannot be blended")
        if not all(weight > 0 for weight in weights):
            raise ConfigError(f"blend: weights must be positive, got {list(weights)}")
        if size is None and not all(float(weight).is_integer() for weight in weights):
            raise ConfigError(
                f"blend: without a size the weights are sample counts and must be integers, got {list(weights)}"
            )
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, numpy.integer)) or size < 0):
            raise ConfigError(f"blend: size must be a non-negative integer or None, got {size!r}")
        if len(datasets) == 1:
            logger.warning("blending a single dataset (%s)", datasets[0].dataset_path)

        self.datasets = list(datasets)
        self.split = datasets[0].index_split
        self.weights: List[Union[int, float]] = normalize(weights) if size is not None else [int(w) for w in weights]
        self.size = None if size is None else int(size)
        self.config = config
        self.description: Dict[str, Any] = {
            "class": type(self).__name__,
            "datasets": [dataset.unique_description_hash for dataset in self.datasets],
            "split": self.split.name,
            "weights": self.weights,
            "size": self.size,
        }
        self.unique_description_hash = description_hash(self.description)
        total = self.size if self.size is not None else int(sum(self.weights))
        specs = [
            ArraySpec("dataset_index", numpy.dtype(numpy.int16), (total,), 0, len(self.datasets)),
            ArraySpec("dataset_sample_index", numpy.dtype(numpy.int64), (total,), 0, None),
        ]
        check = _oversampling_check([len(dataset) for dataset in self.datasets])
        if cache is None and config.path_to_cache is None:
            arrays = self._build()  # megatron-core does not cache blends without path_to_cache either
            problem = validate_arrays(specs, arrays, check)
            if problem is not None:
                raise ConfigError(f"blend ({self.split.name} split): {problem}")
        else:
            cache = cache if cache is not None else IndexCache(config.path_to_cache)  # type: ignore[arg-type]
            entry = cache.entry(type(self).__name__, self.split.name, self.description, specs, check)
            arrays = cache.load_or_build(entry, lambda: self._build_checked(check))
        self.dataset_index: numpy.ndarray = arrays["dataset_index"]
        self.dataset_sample_index: numpy.ndarray = arrays["dataset_sample_index"]

    def _build(self) -> Dict[str, numpy.ndarray]:
        if self.size is not None:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        else:
            dataset_index, dataset_sample_index = build_exhaustive_blending_indices([int(w) for w in self.weights])
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def _build_checked(self, check: EntryCheck) -> Dict[str, numpy.ndarray]:
        """_build, with oversampling reported as a configuration problem (not as a corrupt cache)."""
        arrays = self._build()
        problem = check(arrays)
        if problem is not None:
            raise ConfigError(f"blend ({self.split.name} split): {problem}")
        return arrays

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        dataset_id = int(self.dataset_index[idx])
        sample = self.datasets[dataset_id][int(self.dataset_sample_index[idx])]
        return {"dataset_id": dataset_id, **sample}

    def __repr__(self) -> str:
        return f"BlendedDataset(split={self.split.name}, datasets={len(self.datasets)}, samples={len(self)})"


_SURPLUS_HINT = "increase mid_level_dataset_surplus (e.g. ten-fold) so each dataset builds a larger margin of samples"
