"""Per-rank memory: parameters and gradient buffers are 1/TP and 1/PP of the model (exactly what
`megalign.parallel.memory.rank_parameters` says), and optimizer state is 1/DP with the distributed optimizer."""
from __future__ import annotations

from typing import Dict

import pytest
import torch

from megalign.config.sections import OptimizationSection, ParallelSection
from megalign.model import ModelOptions, parameter_count, preset
from megalign.parallel import initialize_parallel
from megalign.parallel.memory import rank_parameters
from megalign.training.distributed_optimizer import build_optimizer
from megalign.training.model_chunks import ModelChunks

CONFIG = preset("tiny", num_layers=4, vocab_size=256)


def _rank_memory(rank: int, world: int, tp: int, pp: int, zero1: bool, dtype_name: str) -> Dict[str, int]:
    state = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(3)
    model = ModelChunks(CONFIG, ModelOptions(), state, 1).to(getattr(torch, dtype_name))
    optimizer = build_optimizer(model, OptimizationSection(lr=1e-3), ParallelSection(use_distributed_optimizer=zero1),
                                state)
    (sum(p.float().sum() for p in model.parameters()) * 0.0).backward()  # any gradient will do:
    optimizer.step()  # the optimizer state is allocated at the first step
    stage = model.chunks[0].stage
    return {"params": sum(p.numel() for p in model.parameters()),
            "expected": rank_parameters(CONFIG, tp, len(stage.layers), stage.first, stage.last),
            "grad_buffer": sum(buffer.data.numel() for buffer in optimizer.grads.buffers),
            "optimizer": optimizer.state_numel(), "dp": state.data_parallel_size}


@pytest.mark.parametrize("tp, pp, zero1, dtype", [(2, 2, False, "float32"), (2, 1, True, "bfloat16")])
def test_per_rank_memory_follows_the_layout(distributed, tp: int, pp: int, zero1: bool, dtype: str) -> None:
    results = distributed(_rank_memory, 4, tp, pp, zero1, dtype)
    full = parameter_count(CONFIG)
    for result in results:
        assert result["params"] == result["expected"]
        assert result["params"] <= full // (tp * pp) + full // 4  # about 1/(TP x PP), plus replicated norms/edges
        assert result["params"] <= result["grad_buffer"] <= result["params"] + result["dp"] * 8  # fp32, padding only
        per_param = (2 if dtype == "float32" else 3)  # Adam moments (+ an fp32 master for bf16)
        if zero1:
            shard = per_param * result["params"] / result["dp"]
            assert shard - per_param * result["dp"] <= result["optimizer"] <= shard + per_param * result["dp"] * 8
        else:
            assert result["optimizer"] == per_param * result["params"]
    if zero1:  # the DP ranks together hold the optimizer state once
        by_tp: Dict[int, int] = {}
        for rank, result in enumerate(results):
            by_tp[rank % tp] = by_tp.get(rank % tp, 0) + result["optimizer"]
        assert all(total == 3 * results[rank]["params"] for rank, total in by_tp.items())
