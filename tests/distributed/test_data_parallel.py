"""Data parallelism and the distributed optimizer on gloo ranks, compared with single-process training.

Each rank trains on its slice of every global batch; the single-process run trains on the whole batch in
micro-batches of the same size, so losses, gradients and parameters must agree to fp32 tolerance (bf16:
bf16 rounding). Scenarios share a few spawned jobs (each spawn costs seconds on this machine).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import torch
import torch.distributed as dist

from megalign.model import GPTModel, preset
from megalign.parallel.data_parallel import DataParallelGrads
from megalign.training.distributed_optimizer import DistributedOptimizer
from megalign.training.loss_scale import ConstantLossScaler, DynamicLossScaler, LossScaler
from megalign.training.optimizer import MixedPrecisionOptimizer, param_groups_for

STEPS, SEQ, MICRO = 3, 16, 2  # optimizer steps, sequence length, sequences per micro-batch


def _model(dtype: torch.dtype = torch.float32) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(preset("tiny")).to(dtype)


def _global_batches(global_batch: int, steps: int = STEPS, seed: int = 1) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (global_batch, SEQ + 1), generator=gen) for _ in range(steps)]


def _optimizer(kind: str, model: GPTModel, group: Any, clip: float = 0.0, **kwargs: Any) -> MixedPrecisionOptimizer:
    cls = DistributedOptimizer if kind == "dist" else MixedPrecisionOptimizer
    return cls(param_groups_for(model, 0.1), lr=1e-3, betas=(0.9, 0.95), clip_grad=clip,
               data_parallel_group=group, **kwargs)


def _train(model: GPTModel, opt: MixedPrecisionOptimizer, batches: List[torch.Tensor], rank: int, world: int,
           scaler: Optional[LossScaler] = None, before_step: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Train on this rank's slice of each global batch in micro-batches of MICRO; record everything."""
    scaler = scaler or ConstantLossScaler()
    out: Dict[str, Any] = {"losses": [], "params": [], "skipped": [], "norms": []}
    for step, tokens in enumerate(batches):
        share = tokens.shape[0] // world
        mine = tokens[rank * share:(rank + 1) * share]
        micro = [mine[i:i + MICRO] for i in range(0, share, MICRO)]
        opt.zero_grad()
        total = torch.zeros(())
        for index, chunk in enumerate(micro):
            sync = opt.no_sync() if index < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                loss = model(chunk[:, :-1], labels=chunk[:, 1:]).float() / len(micro)
                scaler.scale(loss).backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        if before_step is not None:
            before_step(step)
        result = opt.step(scaler)
        if step == 0 and not isinstance(opt, DistributedOptimizer):
            out["grads"] = {name: p.main_grad.clone() for name, p in model.named_parameters()}
        out["losses"].append(float(total))
        out["skipped"].append(result.skipped)
        out["norms"].append(result.grad_norm)
        out["params"].append({name: p.detach().float().clone() for name, p in model.named_parameters()})
    return out


def _reference(global_batch: int, dtype: torch.dtype = torch.float32, clip: float = 0.0) -> Dict[str, Any]:
    model = _model(dtype)
    opt = _optimizer("plain", model, None, clip)
    try:
        return _train(model, opt, _global_batches(global_batch), 0, 1)
    finally:
        opt.close()


def _assert_same(run: Dict[str, Any], ref: Dict[str, Any], atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert run["skipped"] == ref["skipped"]
    assert run["norms"] == pytest.approx(ref["norms"], rel=1e-4)
    for step, (mine, theirs) in enumerate(zip(run["params"], ref["params"])):
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], atol=atol, rtol=rtol, msg=f"step {step} {name}")


# ----- DP=2: plain all-reduce, overlap, accumulation, distributed optimizer, NaN, checkpoints -----

def _dp2_job(rank: int, world: int, ref_state: Dict[str, Any]) -> Dict[str, Any]:
    return _convert(_dp2_runs(rank, world, ref_state), True)


def _dp2_runs(rank: int, world: int, ref_state: Dict[str, Any]) -> Dict[str, Any]:
    group = dist.new_group(list(range(world)))
    runs: Dict[str, Any] = {}
    scenarios = [  # name, optimizer kind, global batch, dtype, clip, optimizer kwargs
        ("plain", "plain", 4, torch.float32, 0.0, {}),
        ("plain_accum_overlap", "plain", 8, torch.float32, 0.0, {"overlap_grad_reduce": True, "bucket_size": 20000}),
        ("plain_accum", "plain", 8, torch.float32, 0.0, {}),
        ("dist_clip_overlap", "dist", 8, torch.float32, 0.05, {"overlap_grad_reduce": True, "bucket_size": 20000}),
        ("dist_clip", "dist", 8, torch.float32, 0.05, {}),
        ("dist_bf16", "dist", 8, torch.bfloat16, 0.0, {}),
    ]
    for name, kind, global_batch, dtype, clip, kwargs in scenarios:
        model = _model(dtype)
        opt = _optimizer(kind, model, group, clip, **kwargs)
        if name == "plain_accum_overlap":
            runs["num_buckets"] = len(opt.grads.buckets)
        runs[name] = _train(model, opt, _global_batches(global_batch), rank, world)
        if name == "dist_bf16":  # checkpoint tensors: full, global names, equal to the unsharded optimizer's
            runs["ckpt"] = {key: value.clone() for key, value in opt.state_dict_tensors().items()}
            runs["ckpt_json"] = opt.state_dict_json()
            runs["ckpt_model"] = {k: v.clone() for k, v in model.state_dict().items()}
        opt.close()

    # resume a single-process checkpoint (after 2 steps) as DP=2 distributed optimizer; run step 3
    model = _model(torch.bfloat16)
    ref_state = _convert(ref_state, False)
    model.load_state_dict({key: value.to(torch.bfloat16) for key, value in ref_state["model"].items()})
    opt = _optimizer("dist", model, group)
    opt.load_state_dict_tensors(ref_state["optimizer"], ref_state["json"])
    runs["resumed"] = _train(model, opt, _global_batches(8)[2:], rank, world)
    opt.close()

    # NaN/Inf on rank 1 only, in an element that rank 0 owns after the reduce-scatter: every rank skips
    for label, scaler in (("nan_norm", None), ("nan_scaled", DynamicLossScaler(2.0 ** 8, hysteresis=1))):
        model = _model()
        opt = _optimizer("dist", model, group)
        first = next(slot for buffer in opt.grads.buffers for slot in buffer.slots if slot.start == 0)

        def poison(step: int, param: torch.Tensor = first.param) -> None:
            if step == 1 and rank == 1:
                param.main_grad.view(-1)[0] = float("nan") if label == "nan_norm" else float("inf")

        runs[label] = _train(model, opt, _global_batches(4), rank, world, scaler, poison)
        runs[label]["owned"] = opt.grads.local_range(first.param) is not None and opt.grads.local_range(
            first.param)[0] == 0
        runs[label]["scale"] = scaler.scale_value if scaler is not None else None
        opt.close()

    # overlap with gradient accumulation but without no_sync(): a clear error, not silently wrong gradients
    model = _model()
    opt = _optimizer("plain", model, group, overlap_grad_reduce=True)
    tokens = _global_batches(2, steps=1)[0]
    try:
        for _ in range(2):
            model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
    except RuntimeError as exc:
        runs["misuse"] = str(exc)
    opt.close()
    return runs


@pytest.fixture(scope="module")
def references() -> Iterator[Dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run; restored after, for the tests that follow
    try:
        yield _build_references()
    finally:
        torch.set_num_threads(threads)


def _build_references() -> Dict[str, Any]:
    refs = {"plain": _reference(4), "accum": _reference(8), "clip": _reference(8, clip=0.05),
            "bf16": _reference(8, torch.bfloat16), "nan": _reference(4)}
    # the single-process bf16 checkpoint after 2 steps, and its state after 3
    model = _model(torch.bfloat16)
    opt = _optimizer("plain", model, None)
    _train(model, opt, _global_batches(8)[:2], 0, 1)
    refs["state2"] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                      "optimizer": {k: v.clone() for k, v in opt.state_dict_tensors().items()},
                      "json": opt.state_dict_json()}
    _train(model, opt, _global_batches(8)[2:], 0, 1)
    refs["state3"] = {k: v.clone() for k, v in opt.state_dict_tensors().items()}
    refs["json3"] = opt.state_dict_json()
    opt.close()
    return refs


_JOBS: Dict[str, List[Any]] = {}


def _convert(value: Any, to_numpy: bool) -> Any:
    """Tensors <-> numpy arrays in nested results. A rank returns numpy: tensors would travel through torch's
    shared-memory file descriptors, which vanish when the rank exits before the parent reads them."""
    if isinstance(value, dict):
        return {key: _convert(item, to_numpy) for key, item in value.items()}
    if isinstance(value, list):
        return [_convert(item, to_numpy) for item in value]
    if to_numpy and isinstance(value, torch.Tensor):
        return value.detach().float().numpy().copy()  # bf16 -> fp32 is exact
    if not to_numpy and type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return torch.from_numpy(value)
    return value


def _job(distributed: Callable[..., List[Any]], key: str, fn: Callable[..., Any], world: int, *args: Any) -> List[Any]:
    """Run a spawned job once per module; the tests that check its parts share the results."""
    if key not in _JOBS:
        _JOBS[key] = _convert(distributed(fn, world, *args), False)
    return _JOBS[key]


def test_plain_data_parallel_equals_single_process(distributed, references) -> None:
    ranks = _job(distributed, "dp2", _dp2_job, 2, _convert(references["state2"], True))
    assert ranks[0]["num_buckets"] > 2  # the overlap scenario really used several buckets
    for rank in ranks:
        _assert_same(rank["plain"], references["plain"])
        _assert_same(rank["plain_accum"], references["accum"])
        _assert_same(rank["plain_accum_overlap"], references["accum"])
        for name, grad in references["plain"]["grads"].items():  # the averaged gradients of the first step
            torch.testing.assert_close(rank["plain"]["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(rank["plain_accum_overlap"]["grads"][name], references["accum"]["grads"][name],
                                       atol=1e-6, rtol=1e-5, msg=name)
        assert "run every micro-batch but the last inside no_sync()" in rank["misuse"]


def test_distributed_optimizer_equals_single_process(distributed, references) -> None:
    ranks = _job(distributed, "dp2", _dp2_job, 2, _convert(references["state2"], True))
    for rank in ranks:
        _assert_same(rank["dist_clip"], references["clip"])
        _assert_same(rank["dist_clip_overlap"], references["clip"])
        assert all(norm > 0.05 for norm in references["clip"]["norms"])  # clipping was active
        # bf16: the same micro-batch math; fp32 accumulation order may move a bf16 rounding by one ulp
        _assert_same(rank["dist_bf16"], references["bf16"], atol=1e-2, rtol=2e-2)


def test_non_finite_gradient_on_one_rank_skips_the_step_everywhere(distributed, references) -> None:
    ranks = _job(distributed, "dp2", _dp2_job, 2, _convert(references["state2"], True))
    assert [rank["nan_norm"]["owned"] for rank in ranks] == [True, False]  # poisoned element lives on rank 0
    for rank in ranks:
        for label in ("nan_norm", "nan_scaled"):
            run = rank[label]
            assert run["skipped"] == [False, True, False], label
            for name, value in run["params"][0].items():
                assert torch.equal(run["params"][1][name], value), (label, name)  # the skipped step changed nothing
        assert rank["nan_scaled"]["scale"] == 2.0 ** 7  # every rank backed off its loss scale
    for name, value in ranks[0]["nan_norm"]["params"][2].items():  # and the ranks stay identical afterwards
        assert torch.equal(ranks[1]["nan_norm"]["params"][2][name], value), name


def test_checkpoint_tensors_are_layout_independent(distributed, references) -> None:
    ranks = _job(distributed, "dp2", _dp2_job, 2, _convert(references["state2"], True))
    expected = references["state3"]
    for rank in ranks:
        assert sorted(rank["ckpt"]) == sorted(expected)
        for key, value in expected.items():
            exact = key.startswith("optimizer.step/")
            tolerance = {"atol": 0.0, "rtol": 0.0} if exact else {"atol": 1e-5, "rtol": 1e-3}
            torch.testing.assert_close(rank["ckpt"][key], value, msg=key, **tolerance)
        assert rank["ckpt_json"] == references["json3"]
        # a single-process checkpoint resumed as DP=2 distributed optimizer continues like the single process
        _assert_same(rank["resumed"], {key: value[2:] for key, value in references["bf16"].items() if key != "grads"},
                     atol=1e-2, rtol=2e-2)
    # the DP=2 distributed-optimizer checkpoint resumed in one process continues like the single process
    model = _model(torch.bfloat16)
    model.load_state_dict({key: value.to(torch.bfloat16) for key, value in ranks[0]["ckpt_model"].items()})
    opt = _optimizer("plain", model, None)
    opt.load_state_dict_tensors(ranks[0]["ckpt"], ranks[0]["ckpt_json"])
    try:
        more = _train(model, opt, _global_batches(8, steps=4)[3:], 0, 1)
    finally:
        opt.close()
    model = _model(torch.bfloat16)
    straight = _optimizer("plain", model, None)
    try:
        reference = _train(model, straight, _global_batches(8, steps=4), 0, 1)
    finally:
        straight.close()
    _assert_same(more, {key: value[3:] for key, value in reference.items() if key != "grads"}, atol=1e-2, rtol=2e-2)


# ----- DP=4: distributed optimizer with clipping, per-rank optimizer memory -----

def _dp4_job(rank: int, world: int) -> Dict[str, Any]:
    return _convert(_dp4_runs(rank, world), True)


def _dp4_runs(rank: int, world: int) -> Dict[str, Any]:
    group = dist.new_group(list(range(world)))
    out: Dict[str, Any] = {}
    for dtype, clip in ((torch.float32, 0.05), (torch.bfloat16, 0.0)):
        model = _model(dtype)
        opt = _optimizer("dist", model, group, clip, overlap_grad_reduce=True, bucket_size=30000)
        run = _train(model, opt, _global_batches(8), rank, world)
        out[str(dtype)] = {"run": run, "state_numel": opt.state_numel(), "buckets": len(opt.grads.buckets),
                           "shard_sizes": [bucket.shard_size for bucket in opt.grads.buckets]}
        opt.close()
    return out


def test_distributed_optimizer_dp4_and_memory(distributed, references) -> None:
    ranks = _job(distributed, "dp4", _dp4_job, 4)
    numel = sum(p.numel() for p in _model().parameters())
    for dtype, per_element in ((str(torch.float32), 2), (str(torch.bfloat16), 3)):  # moments (+ fp32 master)
        plain = per_element * numel  # what MixedPrecisionOptimizer holds on every rank
        counts = [rank[dtype]["state_numel"] for rank in ranks]
        assert sum(counts) == plain  # every element's state lives on exactly one rank
        bound = per_element * sum(ranks[0][dtype]["shard_sizes"])  # <= ceil per bucket: 1/DP plus padding
        assert all(count <= bound for count in counts)
        assert bound * 4 - plain < per_element * 4 * ranks[0][dtype]["buckets"]  # padding < DP per bucket
    for rank in ranks:
        _assert_same(rank[str(torch.float32)]["run"], references["clip"])
        _assert_same(rank[str(torch.bfloat16)]["run"], references["bf16"], atol=1e-2, rtol=2e-2)


def test_single_rank_buffers_and_overlap_misuse() -> None:
    """DP=1 (no group): one contiguous buffer in backward order, no communication; overlap is off."""
    model = _model()
    grads = DataParallelGrads(list(model.named_parameters()), bucket_size=10000)
    try:
        buffer = grads.buffers[0]
        assert buffer.data.numel() == sum(p.numel() for p in model.parameters())  # no padding without sharding
        last = list(model.parameters())[-1]
        assert buffer.slots[0].param is last and buffer.slots[0].start == 0  # reverse (backward) order
        assert all(p.main_grad.data_ptr() >= buffer.data.data_ptr() for p in model.parameters())
        assert len(grads.buckets) > 1 and not grads.overlap_grad_reduce
        tokens = _global_batches(2, steps=1)[0]
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        assert all(p.grad is None for p in model.parameters()) and buffer.data.abs().sum() > 0
        grads.finish_grad_sync()
    finally:
        grads.close()
    assert not any(hasattr(p, "main_grad") for p in model.parameters())
