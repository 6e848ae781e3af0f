"""Tensor and sequence parallelism on gloo ranks, each checked against the single-process computation.

Few spawned jobs, many checks each (a spawn costs seconds on this machine): one 2-rank job checks the
collectives, the layers and the vocabulary-parallel cross-entropy inside the ranks; one 4-rank job runs
the whole GPTModel at TP=2 (with DP=2) and TP=4 in several configurations and returns losses and gradients.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import pytest
import torch
from torch.testing import assert_close

from megalign.errors import ConfigError
from megalign.model import GPTModel, ModelOptions, preset
from megalign.model.attention import Attention
from megalign.ops import cross_entropy
from megalign.parallel import (ColumnParallelLinear, ParallelContext, RowParallelLinear, VocabParallelEmbedding,
                               all_reduce_gradient, copy_to_tensor_parallel, gather_from_sequence_parallel,
                               gather_from_tensor_parallel, gather_state_dict, gather_tensor, initialize_parallel,
                               init_normal, reduce_from_tensor_parallel, reduce_scatter_to_sequence_parallel,
                               scatter_to_sequence_parallel, scatter_to_tensor_parallel, shard, shard_state_dict,
                               tensor_parallel_axis, tensor_parallel_replicas, vocab_parallel_cross_entropy)

TIGHT = dict(rtol=1e-5, atol=1e-6)
_RESULTS: Dict[str, List[Any]] = {}


def _once(distributed: Callable[..., List[Any]], fn: Callable[..., Any], world: int) -> List[Any]:
    """Run a job once per test session; the tests of this module read its results."""
    if fn.__name__ not in _RESULTS:
        try:
            _RESULTS[fn.__name__] = distributed(fn, world)
        except BaseException as exc:  # pytest.fail's exception: report it again without another spawn
            _RESULTS[fn.__name__] = exc  # type: ignore[assignment]
    if isinstance(_RESULTS[fn.__name__], BaseException):
        raise _RESULTS[fn.__name__]  # type: ignore[misc]
    return _RESULTS[fn.__name__]


def _per_rank(shape, world: int, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(world)]


def _grad_of(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(upstream)
    return y.detach(), x.grad


# ---------------------------------------------------------------- 2 ranks: mappings, layers, cross-entropy

def _expect(y: torch.Tensor, g: torch.Tensor, want_y: torch.Tensor, want_g: torch.Tensor) -> None:
    assert_close(y, want_y, **TIGHT)
    assert_close(g, want_g, **TIGHT)


def _check_mappings(ctx: ParallelContext) -> int:
    r, w = ctx.tensor_model_parallel_rank, ctx.tensor_model_parallel_size
    xs, gs = _per_rank((2, 4, 6), w, 1), _per_rank((2, 4, 6), w, 2)
    total_x, total_g = sum(xs), sum(gs)
    y, g = _grad_of(lambda t: copy_to_tensor_parallel(t, ctx), xs[0], gs[r])
    _expect(y, g, xs[0], total_g)
    y, g = _grad_of(lambda t: reduce_from_tensor_parallel(t, ctx), xs[r], gs[0])
    _expect(y, g, total_x, gs[0])
    y, g = _grad_of(lambda t: gather_from_tensor_parallel(t, ctx), xs[r], torch.cat(gs, -1))
    _expect(y, g, torch.cat(xs, -1), gs[r])
    y, g = _grad_of(lambda t: scatter_to_tensor_parallel(t, ctx), xs[0], gs[r][..., :3])
    _expect(y, g, xs[0].chunk(w, -1)[r], torch.cat([t[..., :3] for t in gs], -1))
    y, g = _grad_of(lambda t: scatter_to_sequence_parallel(t, ctx), xs[0], gs[r][:, :2])
    _expect(y, g, xs[0][:, 2 * r:2 * r + 2], torch.cat([t[:, :2] for t in gs], 1))
    y, g = _grad_of(lambda t: gather_from_sequence_parallel(t, ctx), xs[r], gs[r].repeat(1, 2, 1))
    _expect(y, g, torch.cat(xs, 1), total_g)  # reduce-scatter of [g_r, g_r]: slice r of the sum
    y, g = _grad_of(lambda t: reduce_scatter_to_sequence_parallel(t, ctx), xs[r], gs[r][:, :2])
    _expect(y, g, total_x[:, 2 * r:2 * r + 2], torch.cat([t[:, :2] for t in gs], 1))
    y, g = _grad_of(lambda t: all_reduce_gradient(t, ctx.group), xs[0], gs[r])
    _expect(y, g, xs[0], total_g)
    with pytest.raises(ValueError, match="sequence length must be a multiple"):
        scatter_to_sequence_parallel(torch.zeros(1, 3, 2), ctx)
    return 8


def _layer_pair(kind: str, c: ParallelContext):
    """(TP layer, full torch layer with the same weights, full input, this rank's input or None)."""
    r, w = c.tensor_model_parallel_rank, c.tensor_model_parallel_size
    full_shape = {"column": (6, 8), "column_gather": (6, 8), "row": (8, 6), "embedding": (16, 8)}[kind]
    torch.manual_seed(7)
    if kind == "embedding":
        layer = VocabParallelEmbedding(16, 8, c, init_method=init_normal(0.3))
        full: torch.nn.Module = torch.nn.Embedding(16, 8)
        full_in, local_in = torch.tensor([[0, 15, 7, 8], [9, 1, 14, 3]]), None
    elif kind == "row":
        layer = RowParallelLinear(6, 8, c, bias=True, init_method=init_normal(0.3))
        full = torch.nn.Linear(6, 8)
        full_in = _per_rank((2, 4, 6), 1, 4)[0]
        local_in = full_in.chunk(w, -1)[r]
    else:
        layer = ColumnParallelLinear(8, 6, c, bias=True, gather_output=kind == "column_gather",
                                     init_method=init_normal(0.3))
        full = torch.nn.Linear(8, 6)
        full_in = _per_rank((2, 4, 8), 1, 3)[0]
        local_in = full_in[:, 2 * r:2 * r + 2] if c.sequence_parallel else full_in
    torch.manual_seed(7)
    full.weight.data.copy_(torch.empty(full_shape).normal_(0.0, 0.3))
    if getattr(full, "bias", None) is not None:
        full.bias.data.normal_()
        layer.bias.data.copy_(shard(full.bias.data, tensor_parallel_axis(layer.bias), w, r))
    if kind != "embedding":
        full_in, local_in = full_in.clone().requires_grad_(True), local_in.clone().requires_grad_(True)
    return layer, full, full_in, local_in


def _check_layers(ctx: ParallelContext) -> int:
    """Column/row/embedding layers (SP off and on) against the full torch layer: outputs, weight and input grads."""
    r, w = ctx.tensor_model_parallel_rank, ctx.tensor_model_parallel_size
    checks = 0
    for sequence_parallel in (False, True):
        c = ParallelContext(w, r, sequence_parallel, ctx.group)
        for kind in ("column", "column_gather", "row", "embedding"):
            layer, full, full_in, local_in = _layer_pair(kind, c)

            def mine(t: torch.Tensor, kind: str = kind) -> torch.Tensor:
                """This rank's part of a full output: its features for a plain column layer, else its
                sequence shard under SP (row, embedding) or everything."""
                if kind == "column":
                    return t.chunk(w, -1)[r]
                if sequence_parallel and kind in ("row", "embedding"):
                    return t[:, 2 * r:2 * r + 2]
                return t

            ref = full(full_in)
            out = layer(local_in if local_in is not None else full_in)
            assert_close(out, mine(ref), **TIGHT)
            upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(11))
            ref.backward(upstream)
            out.backward(mine(upstream))
            for name, param in layer.named_parameters():
                full_grad = getattr(full, name).grad
                assert_close(param.grad, shard(full_grad, tensor_parallel_axis(param), w, r), **TIGHT)
                assert_close(gather_tensor(param.grad, tensor_parallel_axis(param), c), full_grad, **TIGHT)
            if local_in is not None:
                if kind == "row":
                    expected = full_in.grad.chunk(w, -1)[r]
                else:
                    expected = full_in.grad[:, 2 * r:2 * r + 2] if sequence_parallel else full_in.grad
                assert_close(local_in.grad, expected, **TIGHT)
            checks += 1
    return checks


def _check_cross_entropy(ctx: ParallelContext) -> int:
    r, w = ctx.tensor_model_parallel_rank, ctx.tensor_model_parallel_size
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 16, generator=gen) * 4
    labels = torch.randint(0, 16, (3, 5), generator=gen)
    labels[0, :3] = -100
    labels[2, 4] = 15
    for reduction in ("none", "sum", "mean"):
        for label_set in (labels, torch.full_like(labels, -100)):
            full = logits.clone().requires_grad_(True)
            local = logits.chunk(w, -1)[r].clone().requires_grad_(True)
            ref = cross_entropy(full, label_set, reduction=reduction)
            out = vocab_parallel_cross_entropy(local, label_set, ctx, reduction=reduction)
            assert out.dtype == torch.float32 and out.shape == ref.shape
            assert_close(out, ref, **TIGHT)
            upstream = torch.linspace(0.5, 2.0, ref.numel()).reshape(ref.shape)
            ref.backward(upstream)
            out.backward(upstream)
            assert_close(local.grad, full.grad.chunk(w, -1)[r], **TIGHT)
    empty = vocab_parallel_cross_entropy(logits.chunk(w, -1)[r], torch.full_like(labels, -100), ctx)
    assert empty.item() == 0.0
    custom = labels.masked_fill(labels == -100, 3)
    assert_close(vocab_parallel_cross_entropy(logits.chunk(w, -1)[r], custom, ctx, ignore_index=3),
                 cross_entropy(logits, custom, ignore_index=3), **TIGHT)
    half = vocab_parallel_cross_entropy(logits.chunk(w, -1)[r].bfloat16(), labels, ctx)
    assert half.dtype == torch.float32
    assert_close(half, cross_entropy(logits.bfloat16(), labels), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"label 16 is outside the vocabulary \[0, 16\)"):
        vocab_parallel_cross_entropy(logits.chunk(w, -1)[r], labels.masked_fill(labels == 15, 16), ctx)
    return 6


def _two_rank_job(rank: int, world: int) -> Dict[str, int]:
    ctx = initialize_parallel(tensor_model_parallel_size=2).context
    return {"mappings": _check_mappings(ctx), "layers": _check_layers(ctx), "cross_entropy": _check_cross_entropy(ctx)}


@pytest.mark.parametrize("part, count", [("mappings", 8), ("layers", 8), ("cross_entropy", 6)])
def test_collectives_layers_and_cross_entropy_at_tp2(distributed, part: str, count: int) -> None:
    results = _once(distributed, _two_rank_job, 2)
    assert [found[part] for found in results] == [count, count]


# ---------------------------------------------------------------- 4 ranks: the whole model vs one process

CASES: Dict[str, Dict[str, Any]] = {
    # 4 heads / 2 kv heads at TP=2 (with DP=2): kv heads split, one per rank
    "tp2": dict(tp=2, sp=False, config={}),
    "tp2_sp": dict(tp=2, sp=True, config={}),
    # Qwen2 style (q/k/v biases, tied embeddings), packed documents with a loss mask, full recomputation
    "tp2_sp_qwen2_documents_recompute": dict(
        tp=2, sp=True, config=dict(qkv_bias=True, tie_word_embeddings=True), documents=True,
        options=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    # 2 kv heads at TP=4: each kv head replicated on 2 ranks
    "tp4_kv_replicated": dict(tp=4, sp=False, config={}),
    "tp4_sp_kv_replicated_qwen2_documents": dict(
        tp=4, sp=True, config=dict(qkv_bias=True, tie_word_embeddings=True), documents=True,
        options=dict(recompute_granularity="selective")),
    # as many kv heads as TP ranks, untied LM head, custom positions
    "tp4_sp_kv_split": dict(tp=4, sp=True, config=dict(num_key_value_heads=4), documents=True),
}


def _batch(config, documents: bool) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    tokens = torch.randint(0, config.vocab_size, (2, 8), generator=gen)
    labels = torch.randint(0, config.vocab_size, (2, 8), generator=gen)
    batch = {"tokens": tokens, "labels": labels}
    if documents:
        segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [5, 5, 5, 5, 5, 6, 6, 6]])
        starts = torch.tensor([[0, 0, 0, 3, 3, 3, 3, 7], [0, 0, 0, 0, 0, 5, 5, 5]])
        batch.update(segment_ids=segments, position_ids=torch.arange(8).expand(2, 8) - starts,
                     loss_mask=(torch.rand(2, 8, generator=gen) > 0.3).float())
    else:
        labels[1, 2:5] = -100
    return batch


def _model_case(ctx: ParallelContext, case: Dict[str, Any], tp_rank: int) -> Dict[str, Any]:
    config = preset("tiny", **case["config"])
    options = ModelOptions(**case.get("options", {}))
    batch = _batch(config, case.get("documents", False))
    torch.manual_seed(1234)
    single = GPTModel(config, ParallelContext.single(), options)
    reference = single(**batch)
    reference.backward()
    torch.manual_seed(1234)
    model = GPTModel(config, ctx, options)
    expected_shards = shard_state_dict({n: p for n, p in single.named_parameters()}, model)
    exact_init = all(torch.equal(expected_shards[n], p) for n, p in model.named_parameters())
    loss = model(**batch)
    loss.backward()
    bad_local = []
    for name, param in model.named_parameters():
        ref_grad = dict(single.named_parameters())[name].grad
        want = shard(ref_grad, tensor_parallel_axis(param), ctx.tensor_model_parallel_size, tp_rank,
                     tensor_parallel_replicas(param))
        if not torch.allclose(param.grad, want, **TIGHT):
            bad_local.append(name)
    gathered = {n: gather_tensor(p.grad, tensor_parallel_axis(p), ctx, tensor_parallel_replicas(p))
                for n, p in model.named_parameters()}
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k in ("tokens", "position_ids", "segment_ids")}
        logits_error = (model(**inputs) - single(**inputs)).abs().max().item()
    weights = gather_state_dict(model)
    weights_round_trip = all(torch.equal(weights[n], p) for n, p in single.named_parameters())
    out = {"loss": loss.item(), "reference": reference.item(), "exact_init": exact_init, "bad_local": bad_local,
           "logits_error": logits_error, "weights_round_trip": weights_round_trip}
    if tp_rank == 0:  # numpy: tensors put on the result queue are shared memory that dies with the rank
        out.update(grads={n: g.numpy() for n, g in gathered.items()},
                   reference_grads={n: p.grad.numpy() for n, p in single.named_parameters()})
    return out


def _four_rank_job(rank: int, world: int) -> Dict[str, Any]:
    results = {}
    for tp in (2, 4):
        for sp in (False, True):
            state = initialize_parallel(tensor_model_parallel_size=tp, sequence_parallel=sp)
            for name, case in CASES.items():
                if (case["tp"], case["sp"]) == (tp, sp):
                    results[name] = _model_case(state.context, case, state.tensor_model_parallel_rank)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_model_equals_single_process(distributed, case: str) -> None:
    results = _once(distributed, _four_rank_job, 4)
    for rank, per_rank in enumerate(results):
        found = per_rank[case]
        assert found["exact_init"], f"rank {rank}: TP shards differ from the single-process init"
        assert found["weights_round_trip"], f"rank {rank}: gather_state_dict does not give the full weights"
        assert found["bad_local"] == [], f"rank {rank}: local gradient shards differ: {found['bad_local']}"
        assert_close(found["loss"], found["reference"], **TIGHT)
        assert found["logits_error"] < 1e-5
    first = results[0][case]
    assert set(first["grads"]) == set(first["reference_grads"])
    for name, grad in first["grads"].items():
        grad, want = torch.from_numpy(grad), torch.from_numpy(first["reference_grads"][name])
        assert_close(grad, want, **TIGHT, msg=lambda m, n=name: f"{n}: {m}")
        assert grad.abs().max() > 0, f"{name}: gradient is zero, the check would prove nothing"


def test_attention_refuses_kv_heads_that_do_not_fit_tp() -> None:
    group = object()  # construction fails before any communication
    config = preset("tiny", hidden_size=96, num_attention_heads=12, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="larger than num_key_value_heads=3, so it must be a multiple"):
        Attention(config, ParallelContext(4, 0, False, group), init_normal(0.02), init_normal(0.02))
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=2 must divide num_key_value_heads=3"):
        Attention(config, ParallelContext(2, 0, False, group), init_normal(0.02), init_normal(0.02))
    with pytest.raises(ConfigError, match="must divide the vocabulary size"):
        VocabParallelEmbedding(10, 4, ParallelContext(4, 0, False, group))
