"""The .npy index cache: hashed names, validation on load, rebuild-once, atomic writes, single builder."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy
import pytest

from megalign.data.gpt_dataset import GPTDataset, GPTDatasetConfig, Split
from megalign.data.index_cache import ArraySpec, IndexCache, description_hash
from megalign.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megalign.errors import ConfigError, DataFormatError

NAMES = ("document_index", "sample_index", "shuffle_index")


def write(prefix: Path, lengths: List[int]) -> IndexedDataset:
    with IndexedDatasetBuilder(str(prefix), numpy.uint16) as builder:
        for length in lengths:
            builder.add_document(numpy.arange(3, 3 + length, dtype=numpy.uint16))
    return IndexedDataset(str(prefix))


@pytest.fixture()
def dataset(tmp_path: Path) -> IndexedDataset:
    return write(tmp_path / "data_text_document", [int(x) for x in numpy.random.default_rng(1).integers(2, 40, 50)])


def make(dataset: IndexedDataset, cache_dir: Path, num_samples=120, **overrides) -> GPTDataset:
    settings = dict(random_seed=11, sequence_length=8, blend=([dataset.path_prefix], None), split="1,0,0", eod_token=1)
    settings.update(overrides)
    config = GPTDatasetConfig(**settings)
    return GPTDataset(dataset, dataset.path_prefix, (0, len(dataset)), num_samples, Split.train, config, IndexCache(str(cache_dir)))


def entry_path(gpt: GPTDataset, cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{gpt.unique_description_hash}-GPTDataset-train-{name}"


def test_miss_writes_hashed_files_and_hit_loads_them(dataset, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    built = make(dataset, cache)
    assert built.unique_description_hash == description_hash(built.description)
    for name in NAMES:
        assert entry_path(built, cache, f"{name}.npy").is_file()
    stored = json.loads(entry_path(built, cache, "description.json").read_text())
    assert stored == {"cache_format_version": 1, **built.description}
    assert not list(cache.glob(".*.tmp")), "temporary files left behind"
    monkeypatch.setattr(GPTDataset, "_build", lambda self: pytest.fail("a valid cache must not be rebuilt"))
    loaded = make(dataset, cache)
    for name in NAMES:
        assert isinstance(getattr(loaded, name), numpy.memmap)
        numpy.testing.assert_array_equal(getattr(loaded, name), getattr(built, name))


def test_everything_that_shapes_the_indices_changes_the_name(dataset, tmp_path: Path) -> None:
    base = make(dataset, tmp_path / "cache").unique_description_hash
    variants = [
        make(dataset, tmp_path / "cache", random_seed=12),
        make(dataset, tmp_path / "cache", sequence_length=9),
        make(dataset, tmp_path / "cache", num_samples=121),
        make(dataset, tmp_path / "cache", add_extra_token_to_sequence=False),
    ]
    changed = write(tmp_path / "data_text_document", [int(x) for x in numpy.random.default_rng(2).integers(2, 40, 50)])
    variants.append(make(changed, tmp_path / "cache"))  # same path, re-preprocessed data
    hashes = {base} | {variant.unique_description_hash for variant in variants}
    assert len(hashes) == 1 + len(variants)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a numpy file at all")


def _wrong_dtype(path: Path) -> None:
    numpy.save(path, numpy.load(path).astype(numpy.int64))


def _out_of_range(path: Path) -> None:
    numpy.save(path, numpy.load(path) + 10_000)


def _not_monotonic(path: Path) -> None:
    values = numpy.load(path)
    values[[1, -1]] = values[[-1, 1]]
    numpy.save(path, values)


def _object_array(path: Path) -> None:
    numpy.save(path, numpy.array([{"a": 1}], dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    "name, damage",
    [
        ("document_index.npy", _truncate),
        ("sample_index.npy", _garbage),
        ("shuffle_index.npy", _wrong_dtype),
        ("document_index.npy", _out_of_range),
        ("sample_index.npy", _not_monotonic),
        ("shuffle_index.npy", _object_array),
        ("document_index.npy", os.remove),
        ("description.json", lambda p: p.write_text(p.read_text().replace('"random_seed": 11', '"random_seed": 12'))),
        ("description.json", lambda p: p.write_text("{not json")),
        ("description.json", os.remove),
    ],
)
def test_damaged_cache_is_rebuilt_once_with_a_warning(dataset, tmp_path: Path, caplog, name: str, damage: Callable[[Path], None]) -> None:
    cache = tmp_path / "cache"
    original = make(dataset, cache)
    expected = {n: numpy.array(getattr(original, n)) for n in NAMES}
    damage(entry_path(original, cache, name))
    with caplog.at_level(logging.WARNING, logger="megalign.data.index_cache"):
        rebuilt = make(dataset, cache)
    assert "rebuilding GPTDataset train indices" in caplog.text
    for n in NAMES:
        numpy.testing.assert_array_equal(getattr(rebuilt, n), expected[n])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megalign.data.index_cache"):
        make(dataset, cache)
    assert "rebuilding" not in caplog.text  # the rebuilt entry is valid


def spec_cache(tmp_path: Path, size: int = 10):
    cache = IndexCache(str(tmp_path / "cache"))
    entry = cache.entry("Toy", "train", {"size": size}, [ArraySpec("values", numpy.dtype(numpy.int64), (size,), 0, size)])
    return cache, entry


def test_failed_rebuild_is_a_data_format_error(tmp_path: Path) -> None:
    cache, entry = spec_cache(tmp_path)
    with pytest.raises(DataFormatError, match="freshly built Toy train indices are invalid .*shape"):
        cache.load_or_build(entry, lambda: {"values": numpy.arange(9)})
    with pytest.raises(DataFormatError, match="holds 10, not below its bound 10"):
        cache.load_or_build(entry, lambda: {"values": numpy.arange(1, 11)})
    assert not Path(entry.description_path).exists()


def test_a_failing_build_leaves_no_complete_looking_entry(tmp_path: Path) -> None:
    cache, entry = spec_cache(tmp_path)

    def explode() -> Dict[str, numpy.ndarray]:
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cache.load_or_build(entry, explode)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(entry.lock_path).name]
    values = cache.load_or_build(entry, lambda: {"values": numpy.arange(10)})
    numpy.testing.assert_array_equal(values["values"], numpy.arange(10))


def test_unusable_cache_directory_is_a_config_error(dataset, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="^path_to_cache: cannot use .*a_file/cache"):
        make(dataset, blocker / "cache")


def _slow_build(directory: str, counter: str, results: str, index: int) -> None:
    cache = IndexCache(directory)
    entry = cache.entry("Toy", "train", {"size": 1000}, [ArraySpec("values", numpy.dtype(numpy.int64), (1000,), 0, 1000)])

    def build() -> Dict[str, numpy.ndarray]:
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return {"values": numpy.arange(1000)}

    values = cache.load_or_build(entry, build)["values"]
    numpy.save(f"{results}-{index}.npy", numpy.asarray(values))


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    counter = str(tmp_path / "builds.txt")
    workers = [
        context.Process(target=_slow_build, args=(str(tmp_path / "cache"), counter, str(tmp_path / "result"), i))
        for i in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(Path(counter).read_text().split()) == 1
    for i in range(3):
        numpy.testing.assert_array_equal(numpy.load(tmp_path / f"result-{i}.npy"), numpy.arange(1000))


def _distributed_worker(rank: int, port: int, directory: str, counter: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cache = IndexCache(directory)
        entry = cache.entry("Toy", "train", {"size": 50}, [ArraySpec("values", numpy.dtype(numpy.int64), (50,), 0, 50)])

        def build() -> Dict[str, numpy.ndarray]:
            with open(counter, "a") as handle:
                handle.write(f"rank{rank}\n")
            return {"values": numpy.arange(50)}

        values = cache.load_or_build(entry, build)["values"]
        assert numpy.array_equal(values, numpy.arange(50))
    finally:
        dist.destroy_process_group()


def test_distributed_rank_zero_builds_and_others_load(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    counter = str(tmp_path / "builds.txt")
    workers = [context.Process(target=_distributed_worker, args=(rank, port, str(tmp_path / "cache"), counter)) for rank in (1, 0)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert Path(counter).read_text().split() == ["rank0"]
