"""Micro-batches for the trainer: sample ids from a :class:`PretrainingSampler` -> stacked tensors.

A ``torch.utils.data.DataLoader`` runs the sampler: with --num-workers N > 0, N worker processes read and
collate the next micro-batches (two each in flight) while the model computes, into pinned memory when the
model is on a GPU. The sampler alone decides which samples come in which order, so the stream is the same
for any number of workers. The training stream is driven by ``consumed_samples`` (the sampler starts
there), so a resumed run reads exactly the samples an uninterrupted run would have read next. Evaluation
always reads the first ``eval_iters`` global batches of the validation split, so successive evaluations are
comparable and do not depend on where training stopped or resumed.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Sequence, Sized, cast

import torch
from torch.utils.data import DataLoader, Dataset

from megalign.data.samplers import PretrainingSampler

MODEL_INPUTS = ("tokens", "position_ids", "segment_ids", "labels", "loss_mask")


def collate(samples: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample tensors (``tokens``, ``labels``, ...) into ``[batch, seq]`` tensors.

    Scalars (a BlendedDataset's ``dataset_id``) become a ``[batch]`` tensor.
    """
    return {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in samples[0]}


def micro_batches(
    dataset: Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of ``dataset`` in sampler order, starting after
    ``consumed_samples`` samples (counted over all ranks), read by ``num_workers`` DataLoader workers."""
    sampler = PretrainingSampler(
        total_samples=len(cast(Sized, dataset)),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return iter(loader)


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """The keyword arguments of ``GPTModel.forward`` present in ``batch``, moved to ``device`` (asynchronously
    from the DataLoader's pinned memory on a GPU)."""
    return {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if key in batch}


def take(iterator: Iterator[Dict[str, torch.Tensor]], count: int, what: str) -> List[Dict[str, torch.Tensor]]:
    """The next ``count`` micro-batches; RuntimeError if the dataset ran out (a sizing bug, not user error)."""
    batches = []
    for _ in range(count):
        try:
            batches.append(next(iterator))
        except StopIteration:
            raise RuntimeError(f"the {what} dataset ran out of samples; it was built too small") from None
    return batches
