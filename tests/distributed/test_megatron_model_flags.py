"""Megatron's model flags under tensor parallelism: with --attention-dropout / --hidden-dropout (and --kv-channels,
--apply-layernorm-1p) a TP=2 model, with and without sequence parallelism, computes the loss and gradients of
the single-process model with the same seeds: the dropout masks are the same at any TP size."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch.testing import assert_close

from megalign.model import GPTModel, preset
from megalign.parallel import (
    ParallelContext,
    initialize_parallel,
    shard,
    tensor_parallel_axis,
    tensor_parallel_replicas,
)

TIGHT = dict(rtol=1e-5, atol=1e-6)
CONFIG = dict(attention_dropout=0.25, hidden_dropout=0.25, kv_channels=24, apply_layernorm_1p=True)


def _case(context: ParallelContext, rank: int) -> Dict[str, Any]:
    config = preset("tiny", **CONFIG)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, config.vocab_size, (2, 8), generator=gen)
    labels = torch.randint(0, config.vocab_size, (2, 8), generator=gen)
    torch.manual_seed(1234)
    single = GPTModel(config, ParallelContext.single()).train()
    torch.manual_seed(99)  # the dropout seed of the forward pass comes from the global RNG
    reference = single(tokens, labels=labels)
    reference.backward()
    torch.manual_seed(1234)
    model = GPTModel(config, context).train()
    torch.manual_seed(99)
    loss = model(tokens, labels=labels)
    loss.backward()
    bad = []
    for name, param in model.named_parameters():
        want = shard(
            dict(single.named_parameters())[name].grad,
            tensor_parallel_axis(param),
            context.tensor_model_parallel_size,
            rank,
            tensor_parallel_replicas(param),
        )
        if not torch.allclose(param.grad, want, **TIGHT):
            bad.append(name)
    with torch.no_grad():
        plain = single.eval()(tokens, labels=labels).item()  # no dropout in evaluation
    return {"loss": loss.item(), "reference": reference.item(), "bad": bad, "plain": plain}


def _job(rank: int, world: int) -> Dict[str, Any]:
    results = {}
    for sp in (False, True):
        state = initialize_parallel(tensor_model_parallel_size=2, sequence_parallel=sp)
        results[sp] = _case(state.context, state.tensor_model_parallel_rank)
    return results


def test_dropout_at_tp2_equals_single_process(distributed) -> None:
    for rank, per_rank in enumerate(distributed(_job, 2)):
        for sp, found in per_rank.items():
            where = f"rank {rank}, sequence parallel {sp}"
            assert_close(found["loss"], found["reference"], **TIGHT, msg=lambda m, w=where: f"{w}: {m}")
            assert found["bad"] == [], f"{where}: gradient shards differ: {found['bad']}"
            assert abs(found["loss"] - found["plain"]) > 1e-3, f"{where}: dropout did not change the loss"
