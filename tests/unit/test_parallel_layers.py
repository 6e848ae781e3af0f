"""ParallelContext validation, the tensor-parallel layers at size 1 (shapes, biases, plain math), and the
full-then-slice initialisation and split marks of larger sizes (built without communication)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalign.errors import ConfigError
from megalign.parallel import (ColumnParallelLinear, ParallelContext, RowParallelLinear, VocabParallelEmbedding,
                               divide, init_normal, shard, tensor_parallel_axis, tensor_parallel_replicas)


def test_context_defaults_and_single():
    ctx = ParallelContext.single()
    assert ctx == ParallelContext() and ctx.tensor_model_parallel_size == 1 and ctx.tensor_model_parallel_rank == 0


def test_tensor_parallel_size_above_one_needs_a_group():
    with pytest.raises(ConfigError, match="needs its process group"):
        ParallelContext(tensor_model_parallel_size=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size=0"),
    ({"tensor_model_parallel_size": True}, "tensor_model_parallel_size=True"),
    ({"tensor_model_parallel_rank": -1}, "tensor_model_parallel_rank=-1"),
    ({"tensor_model_parallel_rank": 1}, "must be smaller than tensor_model_parallel_size=1"),
])
def test_context_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ParallelContext(**kwargs)


def test_divide_names_what_must_divide():
    assert divide(12, 4, "num_attention_heads") == 3
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=4 must divide num_attention_heads=6"):
        divide(6, 4, "num_attention_heads")


def test_layer_shapes_and_bias_flags():
    ctx = ParallelContext()
    emb = VocabParallelEmbedding(100, 16, ctx)
    assert emb.weight.shape == (100, 16) and (emb.vocab_start_index, emb.vocab_end_index) == (0, 100)
    col = ColumnParallelLinear(16, 24, ctx, bias=True)
    assert col.weight.shape == (24, 16) and col.bias.shape == (24,) and torch.all(col.bias == 0)
    assert ColumnParallelLinear(16, 24, ctx, bias=False).bias is None
    row = RowParallelLinear(24, 16, ctx, bias=True)
    assert row.weight.shape == (16, 24) and row.bias.shape == (16,)
    assert RowParallelLinear(24, 16, ctx, bias=False).bias is None
    names = {n for n, _ in ColumnParallelLinear(4, 4, ctx, bias=False).named_parameters()}
    assert names == {"weight"}


def test_plain_math_at_size_one():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    col = ColumnParallelLinear(16, 24, bias=True)
    torch.nn.init.normal_(col.bias)
    torch.testing.assert_close(col(x), F.linear(x, col.weight, col.bias), rtol=0, atol=0)
    row = RowParallelLinear(24, 16, bias=True)
    torch.nn.init.normal_(row.bias)
    y = torch.randn(3, 5, 24)
    torch.testing.assert_close(row(y), y @ row.weight.T + row.bias, rtol=1e-6, atol=1e-6)
    emb = VocabParallelEmbedding(100, 16)
    tokens = torch.tensor([[0, 99, 7]])
    torch.testing.assert_close(emb(tokens), emb.weight[tokens], rtol=0, atol=0)


def test_init_method_is_applied():
    torch.manual_seed(0)
    big = ColumnParallelLinear(512, 512, bias=False, init_method=init_normal(0.5))
    assert abs(big.weight.std().item() - 0.5) < 0.01
    calls = []
    RowParallelLinear(8, 4, bias=False, init_method=lambda w: calls.append(tuple(w.shape)))
    VocabParallelEmbedding(10, 4, init_method=lambda w: calls.append(tuple(w.shape)))
    assert calls == [(4, 8), (10, 4)]


def test_shards_are_slices_of_the_single_process_init_and_are_marked():
    group = object()  # constructing layers needs no communication
    built = {}
    for rank in (0, 1, None):
        ctx = ParallelContext() if rank is None else ParallelContext(2, rank, False, group)
        torch.manual_seed(3)
        built[rank] = (VocabParallelEmbedding(8, 4, ctx), ColumnParallelLinear(4, 6, ctx), RowParallelLinear(6, 4, ctx))
    for full, half0, half1 in zip(built[None], built[0], built[1]):
        for (name, p), p0, p1 in zip(full.named_parameters(), half0.parameters(), half1.parameters()):
            axis = tensor_parallel_axis(p0)
            assert axis == tensor_parallel_axis(p) and tensor_parallel_replicas(p0) == 1
            assert torch.equal(p0, shard(p, axis, 2, 0)) and torch.equal(p1, shard(p, axis, 2, 1)), name
    assert [tensor_parallel_axis(p) for p in built[0][1].parameters()] == [0, 0]
    assert [tensor_parallel_axis(p) for p in built[0][2].parameters()] == [1, None]
    assert tensor_parallel_axis(built[0][0].weight) == 0 and built[1][0].vocab_start_index == 4
    with pytest.raises(ConfigError, match="replicas=3 must divide tensor_model_parallel_size=2"):
        ColumnParallelLinear(4, 6, ParallelContext(2, 0, False, group), replicas=3)
    with pytest.raises(ConfigError, match="dimension 0 of a tensor of shape \\(6, 4\\) is not divisible into 4"):
        shard(torch.zeros(6, 4), 0, 4, 0)
