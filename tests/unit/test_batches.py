"""The trainer's micro-batch stream: a DataLoader over the resumable sampler gives the same batches with any
number of worker processes, and a stream started at consumed_samples continues the uninterrupted one."""
from __future__ import annotations

import os
from typing import Dict, List

import pytest
import torch

from megalign.training.batches import micro_batches


class CountingDataset(torch.utils.data.Dataset):
    """Sample i holds tokens i*8 .. i*8+7 and labels shifted by one."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        tokens = torch.arange(index * 8, index * 8 + 8)
        return {"tokens": tokens, "labels": tokens + 1, "reader": torch.tensor(os.getpid())}


def _take(stream, count: int) -> List[Dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_same_stream_as_the_training_process(workers: int) -> None:
    dataset = CountingDataset()
    for rank in range(2):
        expected = _take(micro_batches(dataset, 4, 2, data_parallel_rank=rank, data_parallel_size=2), 6)
        got = _take(micro_batches(dataset, 4, 2, data_parallel_rank=rank, data_parallel_size=2, num_workers=workers), 6)
        for want, have in zip(expected, got):
            assert set(want) == set(have)
            for key in ("tokens", "labels"):
                assert torch.equal(want[key], have[key])
            assert set(want["reader"].tolist()) == {os.getpid()}  # no workers: read in this process
            assert os.getpid() not in set(have["reader"].tolist())  # read by a DataLoader worker process
    first = next(micro_batches(dataset, 4, 2, data_parallel_rank=1, data_parallel_size=2, num_workers=workers))
    assert first["tokens"][:, 0].tolist() == [6 * 8, 7 * 8]  # samples 6, 7: rank 1's half of global batch 4..7


def test_resumed_stream_continues_the_uninterrupted_one() -> None:
    dataset = CountingDataset()
    straight = _take(micro_batches(dataset, 0, 4, num_workers=2), 6)
    resumed = _take(micro_batches(dataset, 12, 4, num_workers=2), 3)
    for want, have in zip(straight[3:], resumed):
        assert torch.equal(want["tokens"], have["tokens"])
