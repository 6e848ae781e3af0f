"""Megatron's pre-training batch sampler: a resumable, data-parallel-aware stream of micro-batches.

Samples are consumed in dataset order (the datasets already shuffle). A global micro-batch is
micro_batch_size * data_parallel_size consecutive sample ids; data-parallel rank r takes the slice
[r * micro_batch_size, (r + 1) * micro_batch_size) of each. Starting at `consumed_samples` (saved in
checkpoints) resumes the global stream exactly where it stopped, also after a change of the
data-parallel size or micro-batch size.
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

from megalign.errors import ConfigError


def _positive_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


class PretrainingSampler:
    """Yields this data-parallel rank's micro-batches (lists of sample ids) from consumed_samples on.

    Same semantics as Megatron-LM's MegatronPretrainingSampler, except that a rank whose share of
    the final partial global batch (drop_last=False) is empty yields nothing rather than [] and
    len() counts micro-batches rather than samples. Use as DataLoader(dataset, batch_sampler=...).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        self.total_samples = _positive_int(total_samples, "total_samples", 1)
        self.consumed_samples = _positive_int(consumed_samples, "consumed_samples", 0)
        self.micro_batch_size = _positive_int(micro_batch_size, "micro_batch_size", 1)
        self.data_parallel_size = _positive_int(data_parallel_size, "data_parallel_size", 1)
        self.data_parallel_rank = _positive_int(data_parallel_rank, "data_parallel_rank", 0)
        if self.data_parallel_rank >= self.data_parallel_size:
            raise ConfigError(
                f"data_parallel_rank: {data_parallel_rank} is not below data_parallel_size {data_parallel_size}"
            )
        if self.consumed_samples >= self.total_samples:
            raise ConfigError(
                f"consumed_samples: {consumed_samples} already covers all {total_samples} samples; nothing is left "
                "to train on (raise the number of training samples or start from an earlier checkpoint)"
            )
        if not isinstance(drop_last, bool):
            raise ConfigError(f"drop_last: must be True or False, got {drop_last!r}")
        self.drop_last = drop_last
        self.global_batch = self.micro_batch_size * self.data_parallel_size

    def _bounds(self) -> Tuple[int, int]:
        """(first sample of this rank's first micro-batch, end of the last full global batch)."""
        remaining = self.total_samples - self.consumed_samples
        full_stop = self.consumed_samples + (remaining // self.global_batch) * self.global_batch
        return self.consumed_samples + self.data_parallel_rank * self.micro_batch_size, full_stop

    def _tail(self, full_stop: int) -> List[int]:
        """This rank's part of the final partial global batch (empty with drop_last)."""
        if self.drop_last or full_stop >= self.total_samples:
            return []
        start = full_stop + self.data_parallel_rank * self.micro_batch_size
        return list(range(start, min(start + self.micro_batch_size, self.total_samples)))

    def __iter__(self) -> Iterator[List[int]]:
        first, full_stop = self._bounds()
        for start in range(first, full_stop, self.global_batch):
            yield list(range(start, start + self.micro_batch_size))
        tail = self._tail(full_stop)
        if tail:
            yield tail

    def __len__(self) -> int:
        """Micro-batches this rank yields."""
        _, full_stop = self._bounds()
        return (full_stop - self.consumed_samples) // self.global_batch + (1 if self._tail(full_stop) else 0)
