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

:func:`run_schedule` executes a rank's actions. Activations and gradients travel as untagged p2p messages
in batches of ``torch.distributed.batch_isend_irecv``. Every rank derives every rank's actions
(:func:`pipeline_actions`) and from them the same plan of rounds (:func:`communication_plan`, built by
:func:`megalign.parallel.p2p.plan`): the batches of neighbouring ranks pair one to one and the messages
between two ranks keep their order, so the executor runs without deadlock on gloo and NCCL alike.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megalign.errors import ConfigError
from megalign.parallel.p2p import Message, Round, Step, exchange, plan

__all__ = [
    "Action",
    "PipelineSpec",
    "action_messages",
    "communication_plan",
    "interleaved_schedule",
    "no_pipelining_schedule",
    "one_f_one_b_schedule",
    "pipeline_actions",
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


def action_messages(spec: PipelineSpec, action: Action) -> Step:
    """The message ``action`` receives before it runs and the one it sends after (None on the end stages)."""
    previous, following = spec.ranks[(spec.rank - 1) % spec.size], spec.ranks[(spec.rank + 1) % spec.size]
    stage, last_stage = spec.stage(action.chunk), spec.num_stages - 1
    if action.kind == "F":
        next_chunk = action.chunk + (1 if spec.rank == spec.size - 1 else 0)
        return (
            Message(False, previous, ("F", action.chunk, action.micro_batch)) if stage > 0 else None,
            Message(True, following, ("F", next_chunk, action.micro_batch)) if stage < last_stage else None,
        )
    previous_chunk = action.chunk - (1 if spec.rank == 0 else 0)
    return (
        Message(False, following, ("B", action.chunk, action.micro_batch)) if stage < last_stage else None,
        Message(True, previous, ("B", previous_chunk, action.micro_batch)) if stage > 0 else None,
    )


def pipeline_actions(spec: PipelineSpec, actions: Sequence[Action], num_micro_batches: int) -> Dict[int, List[Action]]:
    """Every rank's actions (global rank -> actions) when this rank runs ``actions``: the schedule of
    :func:`schedule_for`, or its forward actions only, on every rank of the pipeline."""
    me = spec.ranks[spec.rank]
    for forwards_only in (False, True):
        everyone, _ = _planned(spec.size, tuple(spec.ranks), spec.num_chunks, num_micro_batches, forwards_only)
        if list(actions) == everyone[me]:
            return {rank: list(order) for rank, order in everyone.items()}
    shown = ", ".join(map(repr, list(actions)[:8])) + (", ..." if len(actions) > 8 else "")
    raise ValueError(
        f"run_schedule runs the actions of schedule_for(spec, {num_micro_batches}) or their forwards, "
        f"which every pipeline rank derives for itself; got [{shown}] on pipeline rank {spec.rank}"
    )


def communication_plan(spec: PipelineSpec, everyone: Mapping[int, Sequence[Action]]) -> Dict[int, List[Round]]:
    """The rounds of every rank for ``everyone``'s actions (global rank -> actions): the p2p batch to launch,
    then the index of the action to run (see :func:`megalign.parallel.p2p.plan`)."""
    steps = {}
    for rank, order in everyone.items():
        rank_spec = replace(spec, rank=list(spec.ranks).index(rank))
        steps[rank] = [action_messages(rank_spec, a) for a in order]
    return plan(steps)


@lru_cache(maxsize=32)
def _planned(
    size: int, ranks: Tuple[int, ...], num_chunks: int, num_micro_batches: int, forwards_only: bool
) -> Tuple[Dict[int, List[Action]], Dict[int, List[Round]]]:
    """Every rank's actions and rounds (computed once per layout and micro-batch count; do not mutate)."""
    spec = PipelineSpec(size, 0, ranks, num_chunks)
    everyone = {ranks[r]: schedule_for(replace(spec, rank=r), num_micro_batches) for r in range(size)}
    if forwards_only:
        everyone = {rank: [a for a in order if a.kind == "F"] for rank, order in everyone.items()}
    return everyone, communication_plan(spec, everyone)


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

    ``actions`` are :func:`schedule_for`'s over ``num_micro_batches``, or their forwards only, the same on
    every pipeline rank (each rank derives the others' to pair its p2p batches with theirs).
    ``forward_only`` (evaluation): the backward actions are dropped, nothing is kept for a backward pass
    and no autograd graph is built; the forward order of the training schedule is a valid order for it.
    ``backward_context(is_last)`` wraps every backward pass, ``is_last`` for this rank's final one (data
    parallelism reduces gradients during that one only).

    ``forward_step(chunk, x, m)`` runs model chunk ``chunk`` on micro-batch ``m``: ``x`` is None on the first
    global stage (the chunk reads the micro-batch itself), else the received activation (``activation_shape``,
    ``dtype``, requires grad). On the last global stage it returns the micro-batch's loss, already divided by
    the number of micro-batches; the backward pass of that loss accumulates the parameter gradients.
    """
    if spec.size == 1 and spec.num_chunks > 1:
        raise ConfigError(
            "model chunks (--num-layers-per-virtual-pipeline-stage) need --pipeline-model-parallel-size > 1"
        )
    me = spec.ranks[spec.rank]
    forwards_only = forward_only or all(a.kind == "F" for a in pipeline_actions(spec, actions, num_micro_batches)[me])
    everyone, planned = _planned(spec.size, tuple(spec.ranks), spec.num_chunks, num_micro_batches, forwards_only)
    actions, rounds = everyone[me], planned[me]
    saved: Dict[Tuple[int, int], Tuple[Optional[torch.Tensor], torch.Tensor]] = {}
    losses: List[torch.Tensor] = []
    outgoing: Dict[Message, torch.Tensor] = {}
    inbox: Dict[Message, torch.Tensor] = {}

    last_backward = next((a for a in reversed(actions) if a.kind == "B"), None)
    for batch, index in rounds:
        inbox.update(exchange(batch, outgoing, activation_shape, dtype, device, spec.group))
        if index is None:
            continue
        action = actions[index]
        receive, send = action_messages(spec, action)
        received = inbox.pop(receive) if receive is not None else None
        key = (action.chunk, action.micro_batch)
        if action.kind == "F":
            x = received
            if x is not None:
                x.requires_grad_(not forward_only)
            with torch.set_grad_enabled(not forward_only):
                y = forward_step(action.chunk, x, action.micro_batch)
            if send is None:  # the last global stage
                losses.append(y.detach())
            else:
                outgoing[send] = y.detach()
            if not forward_only:
                saved[key] = (x, y)
        else:
            x, y = saved.pop(key)
            with backward_context(action == last_backward) if backward_context else nullcontext():
                torch.autograd.backward(y, grad_tensors=received)
            if send is not None:  # not the first global stage: x was received with requires_grad
                assert x is not None and x.grad is not None
                outgoing[send] = x.grad
    if saved or outgoing or inbox:
        raise RuntimeError(
            f"pipeline schedule left {sorted(saved)} without a backward pass, "
            f"{len(outgoing)} messages unsent and {len(inbox)} unused"
        )
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
