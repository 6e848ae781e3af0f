"""Padded vocabulary rows that differ between save and load (Megatron pads to a multiple of 128 x TP): Llama-3's
128,256 rows saved at TP1 load at TP4 with 128,512 rows and back, for weights, fp32 masters and Adam moments,
from flat-sharded (distributed optimizer) and from whole (plain optimizer) optimizer tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from megalign.checkpoint.format import VOCAB_TENSORS
from megalign.checkpoint.storage import Checkpoint, load_checkpoint
from megalign.config.model import preset
from megalign.config.sections import CheckpointingSection, OptimizationSection, ParallelSection
from megalign.model import ModelOptions
from megalign.parallel import initialize_parallel
from megalign.training.checkpoint_io import CheckpointIO
from megalign.training.distributed_optimizer import build_optimizer
from megalign.training.model_chunks import ModelChunks

TRUE_ROWS, TP4_ROWS = 128256, 128512  # 128,256 is a multiple of 128 (TP1) but not of 512 (TP4)


def _build(tp: int, rows: int, zero1: bool):
    state = initialize_parallel(tensor_model_parallel_size=tp)
    config = preset("tiny", vocab_size=rows, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(7)
    model = ModelChunks(config, ModelOptions(), state, 1).to(torch.bfloat16)
    optimizer = build_optimizer(model, OptimizationSection(lr=1e-2), ParallelSection(use_distributed_optimizer=zero1),
                                state)
    assert model.global_shapes()["embed_tokens.weight"][0] == rows
    return state, model, optimizer


def _save(io: CheckpointIO, optimizer, step: int) -> None:
    io.save(step, optimizer, config={}, consumed_samples=0, extra={"optimizer": optimizer.state_dict_json()})


def _expected(checkpoint: Checkpoint, name: str, rows: int) -> torch.Tensor:
    """The stored global tensor with ``rows`` rows: cut, or padded with zero rows."""
    stored = checkpoint.read_tensor(name)
    out = torch.zeros((rows, *stored.shape[1:]), dtype=stored.dtype)
    keep = min(rows, stored.shape[0])
    out[:keep] = stored[:keep]
    return out


def _check_rank(model: ModelChunks, optimizer, checkpoint: Checkpoint, rows: int, tp_rank: int) -> Dict[str, bool]:
    """Whether this rank's vocabulary weights, masters and moments equal the checkpoint's rows (pad rows zero)."""
    names = model.global_names()
    result = {}
    for pair in optimizer.pairs:
        name = names[pair.name]
        if name not in VOCAB_TENSORS:
            continue
        local_rows = pair.model_param.shape[0]
        state = optimizer.inner.state[pair.master_param]
        for key, value in (("weight", pair.model_param), ("master", pair.master_param),
                           ("exp_avg", state["exp_avg"]), ("exp_avg_sq", state["exp_avg_sq"])):
            stored = name if key == "weight" else f"optimizer.{key}/{name}"
            local = _expected(checkpoint, stored, rows)[tp_rank * local_rows:(tp_rank + 1) * local_rows]
            expect = local if key == "weight" else pair.take(local)  # moments, masters: this rank's flat part
            result[f"{key}/{name}"] = torch.equal(expect.to(value.dtype).reshape(value.shape), value.detach())
            if key == "exp_avg" and tp_rank == 3:  # the last TP4 part holds the pad rows: really zero
                result[f"pad/{name}"] = bool((value.detach().reshape(local_rows, -1)[-(rows - TRUE_ROWS):] == 0).all())
                result[f"nonzero/{name}"] = bool((value.detach() != 0).any())
    return result


def _tp1_save(rank: int, world: int, root: str) -> None:
    state, model, optimizer = _build(1, TRUE_ROWS, zero1=True)  # TP1 x DP4: flat-sharded optimizer state
    (sum((p.float() ** 2).sum() for p in model.parameters()) * 0.5).backward()
    optimizer.step()
    _save(CheckpointIO(model, state, lambda _: None, CheckpointingSection(save=f"{root}/tp1")), optimizer, 1)


def _tp4_load_and_save(rank: int, world: int, root: str) -> Dict[str, bool]:
    state, model, optimizer = _build(4, TP4_ROWS, zero1=False)  # TP4, plain optimizer: whole TP-local tensors
    io = CheckpointIO(model, state, lambda _: None, CheckpointingSection(save=f"{root}/tp4"))
    with load_checkpoint(f"{root}/tp1") as checkpoint:
        io.load_weights(checkpoint)
        io.load_optimizer(checkpoint, optimizer, checkpoint.extra["optimizer"])
        result = _check_rank(model, optimizer, checkpoint, TP4_ROWS, state.tensor_model_parallel_rank)
    _save(io, optimizer, 2)
    return result


def _tp1_load(rank: int, world: int, root: str) -> Dict[str, bool]:
    state, model, optimizer = _build(1, TRUE_ROWS, zero1=True)  # back at TP1 x DP4: flat ranges of 128,256 rows
    io = CheckpointIO(model, state, lambda _: None)
    with load_checkpoint(f"{root}/tp4") as checkpoint:
        io.load_weights(checkpoint)
        io.load_optimizer(checkpoint, optimizer, checkpoint.extra["optimizer"])
        return _check_rank(model, optimizer, checkpoint, TRUE_ROWS, 0)


def test_vocab_rows_follow_the_loading_model(distributed, tmp_path: Path) -> None:
    distributed(_tp1_save, 4, str(tmp_path))
    with load_checkpoint(tmp_path / "tp1") as checkpoint:
        assert checkpoint.metadata.tensors["optimizer.exp_avg/embed_tokens.weight"].flat is not None
        assert checkpoint.metadata.tensors["embed_tokens.weight"].shape == (TRUE_ROWS, 16)
    at_tp4 = distributed(_tp4_load_and_save, 4, str(tmp_path))
    for rank, result in enumerate(at_tp4):
        assert len(result) == 2 * 4 + (4 if rank == 3 else 0) and all(result.values()), (rank, result)
    with load_checkpoint(tmp_path / "tp4") as checkpoint:
        assert checkpoint.metadata.tensors["optimizer.exp_avg/lm_head.weight"].shape == (TP4_ROWS, 16)
    back = distributed(_tp1_load, 4, str(tmp_path))
    for result in back:  # every DP rank owns some rows of the vocabulary tensors (they are most of the model)
        assert result and all(result.values()), result
