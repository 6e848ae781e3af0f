"""Pipeline schedules: the action orders, and gradients equal to the unsplit model's on a real gloo pipeline."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch

from megalign.errors import ConfigError
from megalign.parallel.p2p import Message, plan
from megalign.parallel.pipeline import (
    PipelineSpec,
    action_messages,
    communication_plan,
    interleaved_schedule,
    no_pipelining_schedule,
    one_f_one_b_schedule,
    pipeline_actions,
    run_schedule,
    schedule_for,
)
from megalign.parallel.state import initialize_parallel

LAYERS, WIDTH, MICRO_BATCHES, MICRO_BATCH_SIZE = 8, 16, 4, 3


def test_one_f_one_b_order() -> None:
    assert [repr(a) for a in one_f_one_b_schedule(4, 0, 6)] == \
        ["F0.0", "F0.1", "F0.2", "F0.3", "B0.0", "F0.4", "B0.1", "F0.5", "B0.2", "B0.3", "B0.4", "B0.5"]
    assert [repr(a) for a in one_f_one_b_schedule(4, 3, 3)] == ["F0.0", "B0.0", "F0.1", "B0.1", "F0.2", "B0.2"]
    assert [repr(a) for a in no_pipelining_schedule(2)] == ["F0.0", "B0.0", "F0.1", "B0.1"]


def test_interleaved_order_and_requirements() -> None:
    order = interleaved_schedule(2, 0, 4, 2)
    # micro-batches in groups of pp=2 through chunk 0 then chunk 1; each (chunk, mb) once forward, once backward
    assert [repr(a) for a in order[:6]] == ["F0.0", "F0.1", "F1.0", "F1.1", "F0.2", "B1.0"]
    for kind in "FB":
        done = sorted((a.chunk, a.micro_batch) for a in order if a.kind == kind)
        assert done == [(c, m) for c in range(2) for m in range(4)]
    with pytest.raises(ConfigError, match="multiple of --pipeline-model-parallel-size 2"):
        interleaved_schedule(2, 0, 3, 2)


def _layers(seed: int = 0) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    return torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))


def _micro_batch(m: int) -> torch.Tensor:
    return torch.randn(MICRO_BATCH_SIZE, WIDTH, generator=torch.Generator().manual_seed(100 + m))


def _run_layers(layers, indices, x: torch.Tensor) -> torch.Tensor:
    for i in indices:
        x = torch.tanh(layers[i](x))
    return x


def _loss(x: torch.Tensor) -> torch.Tensor:
    return (x ** 2).mean() / MICRO_BATCHES


def _pipeline_rank(rank: int, world: int, num_chunks: int) -> Dict[str, object]:
    state = initialize_parallel(pipeline_model_parallel_size=world)
    spec = PipelineSpec(state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank,
                        state.pipeline_ranks, num_chunks, state.pipeline_group)
    layers = _layers()
    per_stage = LAYERS // spec.num_stages
    mine = {c: range(spec.stage(c) * per_stage, (spec.stage(c) + 1) * per_stage) for c in range(num_chunks)}

    def forward_step(chunk: int, x, m: int) -> torch.Tensor:
        y = _run_layers(layers, mine[chunk], _micro_batch(m) if x is None else x)
        return _loss(y) if spec.stage(chunk) == spec.num_stages - 1 else y

    actions = schedule_for(spec, MICRO_BATCHES)
    losses = run_schedule(spec, actions, forward_step, MICRO_BATCHES, (MICRO_BATCH_SIZE, WIDTH), torch.float32,
                          torch.device("cpu"))
    grads = {i: layers[i].weight.grad.clone() for c in mine for i in mine[c]}
    evaluation = run_schedule(spec, actions, forward_step, MICRO_BATCHES, (MICRO_BATCH_SIZE, WIDTH), torch.float32,
                              torch.device("cpu"), forward_only=True)
    assert all(not v.requires_grad for v in evaluation)
    assert all(torch.equal(layers[i].weight.grad, grads[i]) for i in grads)  # evaluation left gradients alone
    return {"grads": grads, "losses": [float(v) for v in losses], "evaluation": [float(v) for v in evaluation],
            "untouched": [i for i in range(LAYERS) if layers[i].weight.grad is None]}


@pytest.mark.parametrize("world, num_chunks", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_pipeline_gradients_equal_unsplit_model(distributed, world: int, num_chunks: int) -> None:
    reference = _layers()
    expected_losses: List[float] = []
    for m in range(MICRO_BATCHES):
        loss = _loss(_run_layers(reference, range(LAYERS), _micro_batch(m)))
        loss.backward()
        expected_losses.append(loss.item())
    results = distributed(_pipeline_rank, world, num_chunks)
    grads: Dict[int, torch.Tensor] = {}
    for result in results:
        assert not set(result["grads"]) & set(grads)
        grads.update(result["grads"])
        assert sorted(set(result["untouched"]) | set(result["grads"])) == list(range(LAYERS))
    assert sorted(grads) == list(range(LAYERS))
    for i in range(LAYERS):
        torch.testing.assert_close(grads[i], reference[i].weight.grad, rtol=1e-5, atol=1e-7)
    last = results[-1]["losses"]  # the last global stage is on the last rank
    assert last == pytest.approx(expected_losses, rel=1e-6)
    assert results[-1]["evaluation"] == last
    assert all(not r["losses"] for r in results[:-1])


def test_stage_layer_ranges() -> None:
    from megalign.config.layout import stage_layer_ranges

    assert stage_layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(10, 4, first_stage_layers=1, last_stage_layers=3) == \
        [range(0, 1), range(1, 4), range(4, 7), range(7, 10)]
    assert stage_layer_ranges(5, 1) == [range(0, 5)]
    with pytest.raises(ConfigError, match="--num-layers 6 cannot be split into 4 pipeline stages"):
        stage_layer_ranges(6, 4)
    with pytest.raises(ConfigError, match="leaves a stage without layers"):
        stage_layer_ranges(3, 4, first_stage_layers=0)


# --- p2p: every message in a paired, untagged batch_isend_irecv batch --------------------------------------

def _plans(pp: int, micro_batches: int, num_chunks: int, forward_only: bool) -> Dict[int, List[List[Message]]]:
    """Every rank's non-empty p2p batches for one schedule, in launch order."""
    spec = PipelineSpec(pp, 0, list(range(pp)), num_chunks)
    actions = schedule_for(spec, micro_batches)
    if forward_only:
        actions = [a for a in actions if a.kind == "F"]
    rounds = communication_plan(spec, pipeline_actions(spec, actions, micro_batches))
    return {rank: [batch for batch, _ in rounds[rank] if batch] for rank in rounds}


def _replay(pp: int, micro_batches: int, num_chunks: int, forward_only: bool) -> None:
    """Each rank's rounds follow run_schedule's protocol: every action once and in order, every input received
    before its action runs, every output sent after it, nothing left over."""
    spec = PipelineSpec(pp, 0, list(range(pp)), num_chunks)
    everyone = pipeline_actions(spec, schedule_for(spec, micro_batches), micro_batches)
    if forward_only:
        everyone = {rank: [a for a in order if a.kind == "F"] for rank, order in everyone.items()}
    rounds = communication_plan(spec, everyone)
    for rank, order in everyone.items():
        steps = [action_messages(PipelineSpec(pp, rank, list(range(pp)), num_chunks), a) for a in order]
        produced, inbox, ran = set(), set(), []
        for batch, index in rounds[rank]:
            for message in batch:
                if message.send:
                    produced.remove(message)  # KeyError: sent before it was produced
                else:
                    inbox.add(message)
            if index is not None:
                receive, send = steps[index]
                if receive is not None:
                    inbox.remove(receive)
                if send is not None:
                    produced.add(send)
                ran.append(index)
        assert ran == list(range(len(order))) and not produced and not inbox, rank


def _pairing_problems(plans: Dict[int, List[List[Message]]]) -> List[str]:
    """Per pair of ranks: the k-th batch of r that involves q holds the counterparts of the k-th batch of q
    that involves r, and each direction's messages are taken in the order they are sent."""
    problems = []
    for r in plans:
        for q in plans:
            sent = [m.label for batch in plans[r] for m in batch if m.send and m.peer == q]
            taken = [m.label for batch in plans[q] for m in batch if not m.send and m.peer == r]
            if sent != taken:
                problems.append(f"{r}->{q}: sent {sent}, taken {taken}")
            mine = [sorted((m.counterpart(r) for m in b if m.peer == q), key=repr) for b in plans[r]]
            theirs = [sorted((m for m in b if m.peer == r), key=repr) for b in plans[q]]
            if r != q and [b for b in mine if b] != [b for b in theirs if b]:
                problems.append(f"batches of {r} and {q} do not pair")
    return problems


def _deadlock(plans: Dict[int, List[List[Message]]]) -> Optional[Dict[int, int]]:
    """Simulates the ranks with rendezvous semantics (a batch completes only together with all its peers'
    batches holding the counterparts, as with NCCL); returns each rank's position if they get stuck."""
    position = {rank: 0 for rank in plans}
    while any(position[r] < len(plans[r]) for r in plans):
        current = {r: plans[r][position[r]] for r in plans if position[r] < len(plans[r])}
        ready, changed = set(current), True
        while changed:
            stuck = {r for r in ready
                     if any(m.peer not in ready or m.counterpart(r) not in current[m.peer] for m in current[r])}
            ready, changed = ready - stuck, bool(stuck)
        if not ready:
            return position
        for rank in ready:
            position[rank] += 1
    return None


@pytest.mark.parametrize("pp", [2, 3, 4, 5])
@pytest.mark.parametrize("num_chunks", [1, 2, 3])
def test_p2p_batches_pair_in_order_and_cannot_deadlock(pp: int, num_chunks: int) -> None:
    for micro_batches in range(1, 13):
        if num_chunks > 1 and micro_batches % pp:
            continue
        for forward_only in (False, True):
            case = (pp, micro_batches, num_chunks, forward_only)
            plans = _plans(*case)
            assert all(len(b) == len(set(b)) for p in plans.values() for b in p), case
            assert _pairing_problems(plans) == [], case
            assert _deadlock(plans) is None, case
            _replay(*case)
    # the bare no-tags rule fails this: a send and a receive between the same two ranks fused on one side only
    fused_one_side = {0: [[Message(True, 1, ("F", 0, 0)), Message(False, 1, ("B", 0, 0))]],
                      1: [[Message(False, 0, ("F", 0, 0))], [Message(True, 0, ("B", 0, 0))]]}
    assert _pairing_problems(fused_one_side) and _deadlock(fused_one_side) == {0: 0, 1: 0}


def test_p2p_plan_refuses_schedules_that_do_not_fit() -> None:
    lonely = {0: [(None, Message(True, 1, ("F", 0, 0)))], 1: [(Message(False, 0, ("F", 0, 1)), None)]}
    with pytest.raises(RuntimeError, match="do not fit together"):
        plan(lonely)
    spec = PipelineSpec(2, 0, [0, 1], 1)
    with pytest.raises(ValueError, match=r"actions of schedule_for\(spec, 2\)"):
        pipeline_actions(spec, list(reversed(schedule_for(spec, 2))), 2)
    with pytest.raises(ConfigError, match="need --pipeline-model-parallel-size > 1"):
        run_schedule(PipelineSpec(1, 0, [0], 2), [], lambda c, x, m: x, 1, (1,), torch.float32, torch.device("cpu"))


class _P2PRecorder:
    """Records this process's ``batch_isend_irecv`` batches (op, peer, shape, dtype, tag per op) and every
    isend / irecv / send / recv called outside one."""

    NAMES = ("isend", "irecv", "send", "recv")

    def __init__(self) -> None:
        self.batches: List[List[Tuple[str, int, Tuple[int, ...], torch.dtype, int]]] = []
        self.unbatched: List[Tuple[str, object]] = []
        self._inside = False
        self._saved: Dict[str, object] = {}

    def _patch(self, functions: Dict[str, object]) -> None:
        for name, function in functions.items():
            setattr(torch.distributed.distributed_c10d, name, function)
            setattr(torch.distributed, name, function)

    def __enter__(self) -> "_P2PRecorder":
        c10d = torch.distributed.distributed_c10d
        self._saved = {name: getattr(c10d, name) for name in self.NAMES + ("batch_isend_irecv",)}

        def unbatched(name: str):
            original = self._saved[name]

            def call(*args, **kwargs):
                if not self._inside:
                    self.unbatched.append((name, kwargs.get("tag")))
                return original(*args, **kwargs)
            call.__name__ = name
            return call

        def batch(ops):
            self.batches.append([(op.op.__name__, op.peer, tuple(op.tensor.shape), op.tensor.dtype, op.tag)
                                 for op in ops])
            self._inside = True
            try:
                return self._saved["batch_isend_irecv"](ops)
            finally:
                self._inside = False

        self._patch({**{name: unbatched(name) for name in self.NAMES}, "batch_isend_irecv": batch})
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch(self._saved)


def _recorded_pipeline_rank(rank: int, world: int, num_chunks: int) -> Dict[str, object]:
    with _P2PRecorder() as recorder:
        result = _pipeline_rank(rank, world, num_chunks)
    return {**result, "batches": recorder.batches, "unbatched": recorder.unbatched}


@pytest.mark.parametrize("world, num_chunks", [(2, 2), (4, 1)])
def test_gloo_pipeline_p2p_is_batched_untagged_and_follows_the_plan(distributed, world: int,
                                                                    num_chunks: int) -> None:
    results = distributed(_recorded_pipeline_rank, world, num_chunks)
    recorded = {rank: r["batches"] for rank, r in enumerate(results)}
    assert [r["unbatched"] for r in results] == [[]] * world  # no isend/irecv outside a batch
    ops = [op for batches in recorded.values() for batch in batches for op in batch]
    assert ops and all(tag == 0 for *_, tag in ops)
    assert {(shape, dtype) for _, _, shape, dtype, _ in ops} == {((MICRO_BATCH_SIZE, WIDTH), torch.float32)}
    # the training run, then the evaluation run, launched exactly the planned batches
    planned = {rank: [] for rank in range(world)}
    for forward_only in (False, True):
        for rank, batches in _plans(world, MICRO_BATCHES, num_chunks, forward_only).items():
            planned[rank] += [[("isend" if m.send else "irecv", m.peer) for m in b] for b in batches]
    assert {rank: [[op[:2] for op in b] for b in batches] for rank, batches in recorded.items()} == planned
    reference = _layers()
    expected = [_loss(_run_layers(reference, range(LAYERS), _micro_batch(m))).item() for m in range(MICRO_BATCHES)]
    assert results[-1]["losses"] == pytest.approx(expected, rel=1e-6)
