"""Pipeline-parallel schedules as plain functions: the order of forward and backward passes per rank, and
an executor that runs that order with point-to-point sends of activations and their gradients.

A pipeline of ``pp`` ranks holds the layer stack in *stages*. With ``v`` virtual stages per rank
(interleaved schedule) rank ``r`` holds model chunks ``c = 0..v-1``, chunk ``c`` being global stage
``c * pp + r``; activations always travel to the next rank (``(r + 1) % pp``) and gradients to the
previous one. A schedule is a list of :class:`Action` (``F`` or ``B`` of one model chunk on one
micro-batch) per rank:

* :func:`no_pipelining_schedule` (pp = 1): F0 B0 F1 B1 ... (gradient accumulation).
* :func:`one_f_one_b_schedule` (PipeDream-flush 1F1B): ``pp - r - 1`` warm-up forwards, then one forward /
  one backward alternately, then the remaining backwards: at most ``pp - r`` micro-batches in flight.
* :func:`interleaved_schedule` (Megatron's interleaved 1F1B, Narayanan et al. 2021): micro-batches in
  groups of ``pp`` go through every chunk; warm-up ``(pp - r - 1) * 2 + (v - 1) * pp`` forwards.

:func:`run_schedule` executes a rank's actions. Each message is tagged with its (chunk, micro-batch,
direction), receives are posted just before they are needed and sends never block, so any order that
respects the data dependencies (all of the above) runs without deadlock on gloo and NCCL alike.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megalign.errors import ConfigError

__all__ = [
    "Action",
    "PipelineSpec",
    "interleaved_schedule",
    "no_pipelining_schedule",
    "one_f_one_b_schedule",
    "run_schedule",
    "schedule_for",
    "sum_tied_embedding_grads",
]

# forward_step(chunk, input_activation_or_None, micro_batch_index) -> activation, or the loss on the last stage
ForwardStep = Callable[[int, Optional[torch.Tensor], int], torch.Tensor]


@dataclass(frozen=True)
class Action:
    """``kind`` "F" (forward) or "B" (backward) of model ``chunk`` on micro-batch ``micro_batch``."""

    kind: str
    chunk: int
    micro_batch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.micro_batch}"


def no_pipelining_schedule(num_micro_batches: int) -> List[Action]:
    """One stage: forward and backward of each micro-batch in turn."""
    order: List[Action] = []
    for m in range(num_micro_batches):
        order += [Action("F", 0, m), Action("B", 0, m)]
    return order


def one_f_one_b_schedule(pp_size: int, pp_rank: int, num_micro_batches: int) -> List[Action]:
    """1F1B for rank ``pp_rank`` of ``pp_size``: warm-up forwards, steady one-forward-one-backward, cool-down."""
    warmup = min(pp_size - pp_rank - 1, num_micro_batches)
    order = [Action("F", 0, m) for m in range(warmup)]
    for i in range(num_micro_batches - warmup):
        order += [Action("F", 0, warmup + i), Action("B", 0, i)]
    order += [Action("B", 0, m) for m in range(num_micro_batches - warmup, num_micro_batches)]
    return order


def interleaved_schedule(pp_size: int, pp_rank: int, num_micro_batches: int, num_chunks: int) -> List[Action]:
    """Megatron's interleaved 1F1B over ``num_chunks`` model chunks per rank (``num_micro_batches % pp_size == 0``)."""
    if num_micro_batches % pp_size:
        raise ConfigError(
            f"the interleaved pipeline schedule needs the number of micro-batches per step "
            f"({num_micro_batches}) to be a multiple of --pipeline-model-parallel-size {pp_size}"
        )
    total = num_micro_batches * num_chunks
    group = pp_size * num_chunks

    def forward(k: int) -> Action:
        return Action("F", (k % group) // pp_size, (k // group) * pp_size + k % pp_size)

    def backward(k: int) -> Action:
        return Action("B", num_chunks - 1 - (k % group) // pp_size, (k // group) * pp_size + k % pp_size)

    warmup = min((pp_size - pp_rank - 1) * 2 + (num_chunks - 1) * pp_size, total)
    order = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [forward(warmup + i), backward(i)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


@dataclass(frozen=True)
class PipelineSpec:
    """This rank's place in its pipeline: size, rank, the group's global ranks, and chunks per rank."""

    size: int
    rank: int
    ranks: Sequence[int]
    num_chunks: int = 1
    group: Optional[Any] = None

    def stage(self, chunk: int) -> int:
        """Global stage index of ``chunk`` on this rank."""
        return chunk * self.size + self.rank

    @property
    def num_stages(self) -> int:
        return self.size * self.num_chunks


def schedule_for(spec: PipelineSpec, num_micro_batches: int) -> List[Action]:
    """The schedule this rank runs: no pipelining, 1F1B, or interleaved (more than one chunk)."""
    if spec.size == 1 and spec.num_chunks == 1:
        return no_pipelining_schedule(num_micro_batches)
    if spec.num_chunks == 1:
        return one_f_one_b_schedule(spec.size, spec.rank, num_micro_batches)
    return interleaved_schedule(spec.size, spec.rank, num_micro_batches, spec.num_chunks)


def _tag(chunk: int, micro_batch: int, backward: bool, num_micro_batches: int) -> int:
    return (chunk * num_micro_batches + micro_batch) * 2 + int(backward)


def run_schedule(
    spec: PipelineSpec,
    actions: Sequence[Action],
    forward_step: ForwardStep,
    num_micro_batches: int,
    activation_shape: Tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    forward_only: bool = False,
    backward_context: Optional[Callable[[bool], ContextManager[Any]]] = None,
) -> List[torch.Tensor]:
    """Run ``actions`` on this rank; returns the losses of the micro-batches whose last stage is here.

    ``forward_only`` (evaluation): the backward actions are skipped, nothing is kept for a backward pass
    and no autograd graph is built; the forward order of the training schedule is a valid order for it.
    ``backward_context(is_last)`` wraps every backward pass, ``is_last`` for this rank's final one (data
    parallelism reduces gradients during that one only).

    ``forward_step(chunk, x, m)`` runs model chunk ``chunk`` on micro-batch ``m``: ``x`` is None on the first
    global stage (the chunk reads the micro-batch itself), else the received activation (``activation_shape``,
    ``dtype``, requires grad). On the last global stage it returns the micro-batch's loss, already divided by
    the number of micro-batches; the backward pass of that loss accumulates the parameter gradients.
    """
    previous, following = spec.ranks[(spec.rank - 1) % spec.size], spec.ranks[(spec.rank + 1) % spec.size]
    last_stage = spec.num_stages - 1
    saved: Dict[Tuple[int, int], Tuple[Optional[torch.Tensor], torch.Tensor]] = {}
    sends: List[Any] = []
    losses: List[torch.Tensor] = []

    def receive(source: int, tag: int) -> torch.Tensor:
        buffer = torch.empty(activation_shape, dtype=dtype, device=device)
        work = dist.irecv(buffer, src=source, group=spec.group, tag=tag)
        assert work is not None  # irecv returns None only on a rank outside the group, and this rank is in it
        work.wait()
        return buffer

    last_backward = max((i for i, a in enumerate(actions) if a.kind == "B"), default=-1)
    for position, action in enumerate(actions):
        stage, key = spec.stage(action.chunk), (action.chunk, action.micro_batch)
        if action.kind == "F":
            x = None
            if stage > 0:
                x = receive(previous, _tag(action.chunk, action.micro_batch, False, num_micro_batches))
                x.requires_grad_(not forward_only)
            with torch.set_grad_enabled(not forward_only):
                y = forward_step(action.chunk, x, action.micro_batch)
            if stage == last_stage:
                losses.append(y.detach())
            else:
                next_chunk = action.chunk + (1 if spec.rank == spec.size - 1 else 0)
                sends.append(
                    dist.isend(
                        y.detach().contiguous(),
                        dst=following,
                        group=spec.group,
                        tag=_tag(next_chunk, action.micro_batch, False, num_micro_batches),
                    )
                )
            if not forward_only:
                saved[key] = (x, y)
        elif not forward_only:
            x, y = saved.pop(key)
            grad = None
            if stage != last_stage:
                grad = receive(following, _tag(action.chunk, action.micro_batch, True, num_micro_batches))
            with backward_context(position == last_backward) if backward_context else nullcontext():
                torch.autograd.backward(y, grad_tensors=grad)
            if stage > 0:
                # x was received (stage > 0) with requires_grad, so the backward pass filled x.grad.
                assert x is not None and x.grad is not None
                previous_chunk = action.chunk - (1 if spec.rank == 0 else 0)
                sends.append(
                    dist.isend(
                        x.grad.contiguous(),
                        dst=previous,
                        group=spec.group,
                        tag=_tag(previous_chunk, action.micro_batch, True, num_micro_batches),
                    )
                )
    for work in sends:
        work.wait()
    if saved:
        raise RuntimeError(f"pipeline schedule left {sorted(saved)} without a backward pass")
    return losses


def sum_tied_embedding_grads(models: Sequence[torch.nn.Module], embedding_group: Optional[Any]) -> None:
    """Tied embeddings under pipeline parallelism: the first stage (token lookup) and the last stage (LM head)
    each hold a copy of the table; sum the two gradients so both copies take the same update.

    Reads ``param.main_grad`` when the optimizer keeps one, else ``param.grad``; a no-op without the group.
    """
    if embedding_group is None:
        return
    for model in models:
        config, stage = getattr(model, "config", None), getattr(model, "stage", None)
        if config is None or not config.tie_word_embeddings or stage is None or not (stage.first or stage.last):
            continue
        if stage.first and stage.last:
            continue  # the whole model on one stage: one copy only
        weight = model.get_parameter("embed_tokens.weight")
        grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
        dist.all_reduce(grad, group=embedding_group)
