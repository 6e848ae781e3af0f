"""Blending indices, BlendedDataset, and the train/valid/test builder (--data-path, --split, sizes)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy
import pytest
import torch

from megalign.data.blended_dataset import BlendedDataset, normalize
from megalign.config.data_paths import parse_data_path, parse_split, split_matrix_from_vector
from megalign.data.dataset_builder import build_gpt_datasets, document_ranges, samples_per_dataset
from megalign.data.gpt_dataset import GPTDataset, GPTDatasetConfig, Split
from megalign.data.index_cache import IndexCache
from megalign.data.index_helpers import build_blending_indices, build_exhaustive_blending_indices
from megalign.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megalign.errors import ConfigError

EOD = 1


def oracle_blend(weights: Sequence[float], size: int):
    """Greedy blending from its definition: give position i to the dataset furthest below its share."""
    drawn = [0] * len(weights)
    which, sample = [], []
    for i in range(size):
        position = max(float(i), 1.0)
        errors = [w * position - d for w, d in zip(weights, drawn)]
        best = max(range(len(weights)), key=lambda d: (errors[d], -d))  # first maximum wins ties
        which.append(best)
        sample.append(drawn[best])
        drawn[best] += 1
    return numpy.array(which), numpy.array(sample)


def oracle_exhaustive(sizes: Sequence[int]):
    total = sum(sizes)
    weights = [s / total for s in sizes]
    drawn = [0] * len(sizes)
    which, sample = [], []
    for i in range(total):
        position = max(float(i), 1.0)
        candidates = [d for d in range(len(sizes)) if drawn[d] < sizes[d]]
        best = max(candidates, key=lambda d: (weights[d] * position - drawn[d], -d))
        which.append(best)
        sample.append(drawn[best])
        drawn[best] += 1
    return numpy.array(which), numpy.array(sample)


@pytest.mark.parametrize("seed", range(6))
def test_blending_indices_match_oracle(seed: int) -> None:
    rng = numpy.random.default_rng(seed)
    weights = normalize(rng.random(int(rng.integers(1, 6))) + 0.01)
    size = int(rng.integers(0, 400))
    which, sample = build_blending_indices(weights, size)
    assert which.dtype == numpy.int16 and sample.dtype == numpy.int64
    expected_which, expected_sample = oracle_blend(weights, size)
    numpy.testing.assert_array_equal(which, expected_which.reshape(-1))
    numpy.testing.assert_array_equal(sample, expected_sample.reshape(-1))


@pytest.mark.parametrize("sizes", [[5], [3, 7], [10, 1, 4], [2, 2, 2, 9]])
def test_exhaustive_blending_matches_oracle(sizes: List[int]) -> None:
    which, sample = build_exhaustive_blending_indices(sizes)
    expected_which, expected_sample = oracle_exhaustive(sizes)
    numpy.testing.assert_array_equal(which, expected_which)
    numpy.testing.assert_array_equal(sample, expected_sample)
    assert numpy.bincount(which).tolist() == sizes


def test_blending_argument_errors() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        build_blending_indices([0.5, -0.5], 10)
    with pytest.raises(ValueError, match="1 to 32767"):
        build_blending_indices([], 10)
    with pytest.raises(ValueError, match="integers"):
        build_exhaustive_blending_indices([1.5, 2.0])


# --- command-line pieces -------------------------------------------------------------------------


def test_parse_data_path() -> None:
    assert parse_data_path(["/d/a"]) == (["/d/a"], None)
    assert parse_data_path(["/d/a", "/d/b", "/d/c"]) == (["/d/a", "/d/b", "/d/c"], None)
    assert parse_data_path(["0.3", "/d/a", "70", "/d/b"]) == (["/d/a", "/d/b"], [0.3, 70.0])
    assert parse_data_path(["/d/a", "/d/b"]) == (["/d/a", "/d/b"], None)
    with pytest.raises(ConfigError, match="--data-path: .* mixes weights and prefixes"):
        parse_data_path(["0.3", "/d/a", "/d/b", "/d/c"])
    with pytest.raises(ConfigError, match="--data-path: weight 0.0 of /d/a must be positive"):
        parse_data_path(["0", "/d/a", "1", "/d/b"])
    with pytest.raises(ConfigError, match="--data-path"):
        parse_data_path([])


def test_parse_split_and_ranges() -> None:
    vector = parse_split("969,30,1")
    assert vector == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98, 2") == pytest.approx([0.98, 0.02, 0.0])
    matrix = split_matrix_from_vector(vector)
    assert document_ranges(1000, matrix) == [(0, 969), (969, 999), (999, 1000)]
    assert split_matrix_from_vector(parse_split("1,0,0"))[1:] == [None, None]
    # Python rounds halves to even: 0.5 * 5 = 2.5 -> 2
    assert document_ranges(5, split_matrix_from_vector(parse_split("1,1"))) == [(0, 2), (2, 5), None]
    for bad in ("a,b", "1,-1", "", "1,2,3,4"):
        with pytest.raises(ConfigError, match="^split"):
            parse_split(bad)


def test_samples_per_dataset_has_the_half_percent_margin() -> None:
    weights = normalize([0.3, 0.7])
    assert samples_per_dataset(weights, [1000, 10, None]) == [[300, 3, None], [700, 7, None]]
    assert samples_per_dataset(weights, [1000, 10, None], 0.005) == [[302, 4, None], [704, 8, None]]


# --- datasets ------------------------------------------------------------------------------------


def write(prefix: Path, count: int, seed: int) -> str:
    rng = numpy.random.default_rng(seed)
    with IndexedDatasetBuilder(str(prefix), numpy.uint16) as builder:
        for _ in range(count):
            document = rng.integers(3, 900, size=int(rng.integers(2, 40))).astype(numpy.uint16)
            document[-1] = EOD
            builder.add_document(document)
    return str(prefix)


@pytest.fixture()
def prefixes(tmp_path: Path) -> List[str]:
    return [write(tmp_path / f"part{i}_text_document", count, seed=i) for i, count in enumerate((120, 80, 50))]


def make_config(tmp_path: Path, **overrides) -> GPTDatasetConfig:
    settings = dict(random_seed=7, sequence_length=16, split="90,8,2", path_to_cache=str(tmp_path / "cache"), eod_token=EOD, pad_token=2)
    settings.update(overrides)
    return GPTDatasetConfig(**settings)


def test_weighted_blend_follows_weights(tmp_path: Path, prefixes: List[str]) -> None:
    cfg = make_config(tmp_path, blend=(prefixes, [0.5, 0.3, 0.2]))
    train, valid, test = build_gpt_datasets(cfg, [400, 40, 10])
    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 40 and len(test) == 10
    counts = numpy.bincount(numpy.asarray(train.dataset_index), minlength=3)
    assert counts.tolist() == [200, 120, 80]
    # each member was built with the 0.5% surplus: ceil(ceil(400 * w) * 1.005) samples at least
    assert [member.num_samples for member in train.datasets] == [201, 121, 81]
    sample = train[5]
    member = train.datasets[sample["dataset_id"]]
    expected = member[int(train.dataset_sample_index[5])]
    assert torch.equal(sample["tokens"], expected["tokens"]) and set(sample) == {"dataset_id", *expected}


def test_unweighted_blends(tmp_path: Path, prefixes: List[str]) -> None:
    cfg = make_config(tmp_path, blend=(prefixes[:2], None))
    train, valid, _ = build_gpt_datasets(cfg, [50, None, None])
    lengths = [len(member) for member in valid.datasets]
    assert len(train) == 50 and valid.size is None and len(valid) == sum(lengths)  # one epoch of each, all used
    assert numpy.bincount(numpy.asarray(valid.dataset_index)).tolist() == lengths


def test_single_prefix_gives_plain_datasets(tmp_path: Path, prefixes: List[str]) -> None:
    cfg = make_config(tmp_path, blend=(prefixes[:1], None))
    train, valid, test = build_gpt_datasets(cfg, [100, None, None])
    assert all(isinstance(d, GPTDataset) for d in (train, valid, test))
    assert train.document_range == (0, 108) and valid.document_range == (108, 118) and test.document_range == (118, 120)
    assert len(train) >= 100


def test_blend_per_split(tmp_path: Path, prefixes: List[str]) -> None:
    cfg = make_config(tmp_path, split=None, blend_per_split=[(prefixes[:2], [1.0, 3.0]), (prefixes[2:], None), None])
    train, valid, test = build_gpt_datasets(cfg, [60, None, None])
    assert isinstance(train, BlendedDataset) and len(train) == 60 and test is None
    assert isinstance(valid, GPTDataset) and valid.document_range == (0, 50)
    assert numpy.bincount(numpy.asarray(train.dataset_index)).tolist() == [15, 45]


def test_weights_need_sizes(tmp_path: Path, prefixes: List[str]) -> None:
    with pytest.raises(ConfigError, match="sizes: the valid split blends weighted datasets"):
        build_gpt_datasets(make_config(tmp_path, blend=(prefixes, [1.0, 1.0, 1.0])), [10, None, 5])
    with pytest.raises(ConfigError, match="sizes: need 3"):
        build_gpt_datasets(make_config(tmp_path, blend=(prefixes, None)), [10])


def test_oversampling_is_a_clear_error(tmp_path: Path, prefixes: List[str]) -> None:
    cfg = make_config(tmp_path, blend=(prefixes[:2], None))
    dataset = IndexedDataset(prefixes[1])
    small = GPTDataset(dataset, prefixes[1], (0, 10), None, Split.train, cfg, IndexCache(tmp_path / "c"))
    big = GPTDataset(dataset, prefixes[1], (10, 80), None, Split.train, cfg, IndexCache(tmp_path / "c"))
    with pytest.raises(ConfigError, match="requests .* samples from dataset 0, .*mid_level_dataset_surplus"):
        BlendedDataset([small, big], [0.5, 0.5], 2 * len(big), cfg)
    with pytest.raises(ConfigError, match="mid_level_dataset_surplus"):  # the cached path too
        BlendedDataset([small, big], [0.5, 0.5], 2 * len(big), cfg, IndexCache(tmp_path / "c"))
    with pytest.raises(ConfigError, match="blend: weights must be positive"):
        BlendedDataset([small, big], [0.0, 1.0], 5, cfg)
    with pytest.raises(ConfigError, match="must be integers"):
        BlendedDataset([small, big], [0.5, 1.0], None, cfg)


def test_blend_is_cached_and_reloaded(tmp_path: Path, prefixes: List[str], monkeypatch) -> None:
    cfg = make_config(tmp_path, blend=(prefixes, [0.2, 0.3, 0.5]))
    first = build_gpt_datasets(cfg, [300, 30, 10])[0]
    assert list((tmp_path / "cache").glob(f"{first.unique_description_hash}-BlendedDataset-train-*.npy"))
    monkeypatch.setattr(BlendedDataset, "_build", lambda self: pytest.fail("the blend should come from the cache"))
    second = build_gpt_datasets(cfg, [300, 30, 10])[0]
    numpy.testing.assert_array_equal(second.dataset_index, first.dataset_index)
    numpy.testing.assert_array_equal(second.dataset_sample_index, first.dataset_sample_index)
