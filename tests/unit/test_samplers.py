"""The pre-training sampler: resumable at any consumed_samples, and split across data-parallel ranks."""
from __future__ import annotations

from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalign.data.samplers import PretrainingSampler
from megalign.errors import ConfigError


def global_stream(total: int, consumed: int, micro: int, dp: int, drop_last: bool) -> List[List[int]]:
    """Each step's global batch: the ranks' micro-batches concatenated in rank order."""
    per_rank = [list(PretrainingSampler(total, consumed, micro, rank, dp, drop_last)) for rank in range(dp)]
    steps = max(len(batches) for batches in per_rank)
    return [sum((batches[step] for batches in per_rank if step < len(batches)), []) for step in range(steps)]


def flat(batches: List[List[int]]) -> List[int]:
    return [index for batch in batches for index in batch]


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(1, 120),
    micro=st.integers(1, 6),
    dp=st.integers(1, 5),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_resume_reproduces_the_tail_and_ranks_cover_the_stream(total: int, micro: int, dp: int, drop_last: bool, data) -> None:
    full = global_stream(total, 0, micro, dp, drop_last)
    single = [batch for batch in PretrainingSampler(total, 0, micro * dp, 0, 1, drop_last)]
    assert full == single  # the union over ranks, step by step, is the single-rank stream
    expected = list(range((total // (micro * dp)) * micro * dp)) if drop_last else list(range(total))
    assert flat(full) == expected
    for batches in (list(PretrainingSampler(total, 0, micro, rank, dp, drop_last)) for rank in range(dp)):
        assert all(0 < len(batch) <= micro for batch in batches)
    # resuming after any number of finished steps gives exactly the remaining steps
    step = data.draw(st.integers(0, len(full)))
    consumed = step * micro * dp
    if consumed < total:
        assert global_stream(total, consumed, micro, dp, drop_last) == full[step:]


def test_resume_with_a_different_data_parallel_size() -> None:
    before = flat(global_stream(100, 0, 2, 4, True)[:5])  # 5 steps of 8 samples at DP 4
    after = flat(global_stream(100, 40, 4, 1, True))  # resume at DP 1 with micro-batch 4
    assert before + after == list(range(100))


def test_rank_slices_of_one_global_batch() -> None:
    assert list(PretrainingSampler(12, 0, 2, 1, 3)) == [[2, 3], [8, 9]]
    assert list(PretrainingSampler(12, 6, 2, 2, 3)) == [[10, 11]]
    assert list(PretrainingSampler(13, 0, 2, 0, 3, drop_last=False)) == [[0, 1], [6, 7], [12]]
    assert list(PretrainingSampler(13, 0, 2, 1, 3, drop_last=False)) == [[2, 3], [8, 9]]  # no empty batch


@pytest.mark.parametrize("total, consumed, micro, dp, drop_last, batches", [(10, 0, 2, 2, True, 2), (10, 0, 2, 2, False, 3), (10, 4, 3, 1, False, 2), (10, 9, 1, 1, True, 1)])
def test_len_counts_this_ranks_micro_batches(total, consumed, micro, dp, drop_last, batches) -> None:
    sampler = PretrainingSampler(total, consumed, micro, 0, dp, drop_last)
    assert len(sampler) == batches == len(list(sampler))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(total_samples=0), "total_samples"),
        (dict(consumed_samples=-1), "consumed_samples"),
        (dict(consumed_samples=10), "consumed_samples"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(data_parallel_rank=2), "data_parallel_rank"),
        (dict(data_parallel_size=0), "data_parallel_size"),
        (dict(drop_last=None), "drop_last"),
    ],
)
def test_errors_name_the_argument(kwargs, field: str) -> None:
    arguments = dict(total_samples=10, consumed_samples=0, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2)
    arguments.update(kwargs)
    with pytest.raises(ConfigError, match=f"^{field}"):
        PretrainingSampler(**arguments)


def test_works_as_a_dataloader_batch_sampler() -> None:
    dataset = torch.arange(100) * 10
    sampler = PretrainingSampler(100, 20, 4, 1, 2)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    batches = [batch.tolist() for batch in loader]
    assert batches[0] == [240, 250, 260, 270] and len(batches) == len(sampler) == 10
