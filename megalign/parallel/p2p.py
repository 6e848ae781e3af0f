"""Point-to-point messages of the pipeline executor: which message goes in which batch, and launching a batch
through ``torch.distributed.batch_isend_irecv``.

NCCL has no message tags, and two ranks that each block in a send to the other deadlock. So every message
here is an untagged :class:`torch.distributed.P2POp` inside a batch, and the batches of all ranks are
derived together so that they pair by construction. :func:`plan` simulates the pipeline in lockstep rounds
over every rank's list of steps (a step = the message an action receives before it runs, the one it sends
after). In each round:

1. every rank that waits for an input *offers* that one receive; a receive is *matched* when its sender has
   produced the message (it is pending there);
2. each rank's batch of the round is its matched sends (forward before backward) and its matched receive:
   the same messages on both ends, and at most one per direction between two ranks, since a rank takes at
   most one message per round;
3. every rank whose next action has its input (or needs none) runs that one action; its output becomes
   pending until the receiver asks for it.

So the k-th batch a rank launches that involves a neighbour holds exactly the counterparts of the k-th batch
that neighbour launches involving it (pairing), and the messages between two ranks are taken in the order
they are launched on both ends (FIFO, the only way untagged messages can match). No wait cycle exists: the
unfinished batches of the earliest round that has any only involve ranks at that same round, so they all
complete. Each rank replays its rounds: launch the round's batch, wait for all of it, run the round's
action. In 1F1B's steady phase this yields Megatron's ``send_forward_recv_backward`` /
``send_backward_recv_forward`` exchanges.

With NCCL, the first ``batch_isend_irecv`` on a group must involve all of its ranks unless the group has
already run a collective. The first batches here involve only neighbours, so
:func:`megalign.parallel.launch.setup_parallel` runs a barrier on the pipeline group first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist

__all__ = ["Message", "Round", "Step", "exchange", "plan"]


@dataclass(frozen=True)
class Message:
    """One message as one rank sees it: ``send`` or receive, the peer's global rank, and ``label``, the
    receiving action (kind "F" or "B", chunk on the receiver, micro-batch), the same on both ends."""

    send: bool
    peer: int
    label: Tuple[str, int, int]

    def counterpart(self, rank: int) -> Message:
        """The same message as the peer sees it, ``rank`` being this rank's global rank."""
        return Message(not self.send, rank, self.label)


# (message received before an action runs, message sent after it), either may be None
Step = Tuple[Optional[Message], Optional[Message]]
# (the batch to launch and wait for, then the index of the step to run or None)
Round = Tuple[List[Message], Optional[int]]


def _order(message: Message) -> Tuple[bool, str]:
    return not message.send, message.label[0]


def plan(steps: Mapping[int, Sequence[Step]]) -> Dict[int, List[Round]]:
    """Every rank's rounds for ``steps`` (global rank -> its steps in order); rounds in which a rank neither
    communicates nor runs are left out. Raises RuntimeError when the ranks' steps do not fit together (a
    receive nobody sends, a send nobody receives)."""
    position = {rank: 0 for rank in steps}
    pending: Dict[int, Set[Message]] = {rank: set() for rank in steps}  # produced sends, not yet taken
    rounds: Dict[int, List[Round]] = {rank: [] for rank in steps}

    def waiting(rank: int) -> Optional[Message]:
        return steps[rank][position[rank]][0] if position[rank] < len(steps[rank]) else None

    while any(position[r] < len(steps[r]) or pending[r] for r in steps):
        batches: Dict[int, List[Message]] = {rank: [] for rank in steps}
        has_input = {rank: True for rank in steps}
        for rank in steps:
            receive = waiting(rank)
            if receive is None:
                continue
            sender, send = receive.peer, receive.counterpart(rank)
            if send in pending.get(sender, ()):
                pending[sender].remove(send)
                batches[sender].append(send)
                batches[rank].append(receive)
            else:
                has_input[rank] = False
        progress = any(batches.values())
        for rank in steps:
            ran: Optional[int] = None
            if position[rank] < len(steps[rank]) and has_input[rank]:
                ran, position[rank] = position[rank], position[rank] + 1
                produced = steps[rank][ran][1]
                if produced is not None:
                    pending[rank].add(produced)
                progress = True
            if batches[rank] or ran is not None:
                rounds[rank].append((sorted(batches[rank], key=_order), ran))
        if not progress:
            stuck = {r: (waiting(r), pending[r]) for r in steps if waiting(r) is not None or pending[r]}
            raise RuntimeError(f"pipeline p2p: the ranks' schedules do not fit together (waiting, unsent): {stuck}")
    return rounds


def exchange(
    batch: Sequence[Message],
    outgoing: Dict[Message, torch.Tensor],
    shape: Tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    group: Optional[Any],
) -> Dict[Message, torch.Tensor]:
    """Launch ``batch`` as one ``batch_isend_irecv`` and wait for all of it; returns the received tensors.

    The tensor of each send of the batch is taken out of ``outgoing``; a receive fills a new buffer of
    ``shape`` and ``dtype``.
    """
    ops: List[dist.P2POp] = []
    received: Dict[Message, torch.Tensor] = {}
    for message in batch:
        if message.send:
            ops.append(dist.P2POp(dist.isend, outgoing.pop(message).contiguous(), message.peer, group))
        else:
            buffer = received[message] = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buffer, message.peer, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received
