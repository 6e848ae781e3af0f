"""One process with the distributed optimizer (DP=1) writes flat-sharded optimizer state through CheckpointIO;
it loads back into the plain optimizer and into the distributed one exactly."""
from __future__ import annotations

from pathlib import Path

import torch

from megalign.checkpoint.storage import load_checkpoint
from megalign.config.model import preset
from megalign.config.sections import CheckpointingSection, OptimizationSection, ParallelSection
from megalign.model import ModelOptions
from megalign.parallel.state import ParallelState
from megalign.training.checkpoint_io import CheckpointIO
from megalign.training.distributed_optimizer import DistributedOptimizer, build_optimizer
from megalign.training.model_chunks import ModelChunks


def _build(zero1: bool):
    torch.manual_seed(3)
    model = ModelChunks(preset("tiny", num_layers=1), ModelOptions(), ParallelState(), 1).to(torch.bfloat16)
    optimizer = build_optimizer(model, OptimizationSection(lr=1e-2), ParallelSection(use_distributed_optimizer=zero1),
                                ParallelState())
    return model, optimizer


def test_single_process_distributed_optimizer_checkpoint_is_flat_and_loads_into_both(tmp_path: Path) -> None:
    model, optimizer = _build(zero1=True)
    assert isinstance(optimizer, DistributedOptimizer)
    for _ in range(2):
        optimizer.zero_grad()
        (sum((p.float() ** 2).sum() for p in model.parameters()) * 0.5).backward()
        optimizer.step()
    shards, steps = optimizer.state_dict_shards(model.global_names())  # views of the live state: no copies
    live = {pair.master_param.data_ptr() for pair in optimizer.pairs}
    live |= {optimizer.inner.state[pair.master_param][key].data_ptr() for pair in optimizer.pairs
             for key in ("exp_avg", "exp_avg_sq")}
    assert shards and {shard.tensor.data_ptr() for shard in shards.values()} <= live and steps
    io = CheckpointIO(model, ParallelState(), lambda _: None, CheckpointingSection(save=str(tmp_path)))
    io.save(2, optimizer, config={}, consumed_samples=0, extra={"optimizer": optimizer.state_dict_json()})
    expected = {key: value.clone() for key, value in optimizer.state_dict_tensors(model.global_names()).items()}
    with load_checkpoint(tmp_path) as checkpoint:
        specs = checkpoint.metadata.tensors
        assert all(specs[name].flat is not None for name in expected if not name.startswith("optimizer.step/"))
        for zero1 in (False, True):
            fresh_model, fresh = _build(zero1)
            fresh_io = CheckpointIO(fresh_model, ParallelState(), lambda _: None)
            fresh_io.load_weights(checkpoint)
            fresh_io.load_optimizer(checkpoint, fresh, checkpoint.extra["optimizer"])
            got = fresh.state_dict_tensors(fresh_model.global_names())
            assert sorted(got) == sorted(expected)
            for name, value in expected.items():
                assert torch.equal(got[name], value), (zero1, name)
            fresh.close()
