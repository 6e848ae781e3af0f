"""The trainer's checkpoint component: what a training checkpoint holds, written from one process or from
every rank of a parallel job, and read back into this rank's model chunks and optimizer at any layout.

Tensors are stored under global names (``layers.17.mlp.up_proj.weight``, ``optimizer.exp_avg/<name>``).
One process writes with :func:`~megalign.checkpoint.storage.save_checkpoint` (optionally from a
background thread, ``--async-save``); a parallel job with
:func:`~megalign.checkpoint.sharded.save_sharded_checkpoint`. Reading always goes through
:func:`~megalign.checkpoint.sharded.read_local_shard`, so a checkpoint saved at any (TP, PP, DP)
layout, with or without the distributed optimizer, loads at any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from megalign.checkpoint.async_save import AsyncCheckpointSaver
from megalign.checkpoint.format import iter_dir_name
from megalign.checkpoint.sharded import read_local_shard, save_sharded_checkpoint
from megalign.checkpoint.storage import Checkpoint, save_checkpoint
from megalign.config.sections import CheckpointingSection
from megalign.errors import ConfigError, DataFormatError
from megalign.parallel.state import ParallelState
from megalign.training.model_chunks import ModelChunks
from megalign.training.optimizer import PREFIX, MixedPrecisionOptimizer

__all__ = ["CheckpointIO"]


class CheckpointIO:
    """Saves and loads the model chunks and optimizer of one rank (``log`` reports saves)."""

    def __init__(
        self,
        model: ModelChunks,
        state: ParallelState,
        log: Callable[[str], None],
        settings: Optional[CheckpointingSection] = None,
    ) -> None:
        self.model, self.state, self.log = model, state, log
        self.settings = settings if settings is not None else CheckpointingSection()
        self.global_shapes = model.global_shapes()
        self.async_saver = (
            AsyncCheckpointSaver(lambda path: log(f"saved checkpoint {path}")) if self.settings.async_save else None
        )

    # ---- saving ------------------------------------------------------------------------------------------
    def _optimizer_shapes(self, names: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
        shapes = {}
        for name in names:
            kind, param = name[len(PREFIX) :].split("/", 1)
            shapes[name] = () if kind == "step" else self.global_shapes[param]
        return shapes

    def save(
        self,
        step: int,
        optimizer: MixedPrecisionOptimizer,
        *,
        config: Mapping[str, Any],
        consumed_samples: int,
        extra: Mapping[str, Any],
    ) -> str:
        """Write checkpoint ``step`` to --save, keeping --keep-last (collective in a parallel job); returns its path."""
        save_dir, keep_last = self.settings.save, self.settings.keep_last
        if save_dir is None:
            raise ConfigError("saving a checkpoint needs --save (where checkpoints go)")
        model_state = self.model.model_state()
        optimizer_state = optimizer.state_dict_tensors(self.model.global_names())  # a collective with ZeRO-1
        metadata: Dict[str, Any] = dict(
            config=config, consumed_samples=consumed_samples, extra=extra, keep_last=keep_last
        )
        if self.state.world_size > 1:
            shapes = {**self.global_shapes, **self._optimizer_shapes(optimizer_state)}
            path = save_sharded_checkpoint(save_dir, step, self.state, model_state, optimizer_state, shapes, **metadata)
        elif self.async_saver is not None:
            self.async_saver.submit(save_dir, step, model_state, optimizer_state, **metadata)
            path = Path(save_dir) / iter_dir_name(step)
            self.log(f"saving checkpoint {path} in the background")
            return str(path)
        else:
            path = save_checkpoint(save_dir, step, model_state, optimizer_state, **metadata)
        self.log(f"saved checkpoint {path}")
        return str(path)

    def wait(self) -> None:
        """Block until a background save is on disk (re-raising its error)."""
        if self.async_saver is not None:
            self.async_saver.wait()

    # ---- loading -----------------------------------------------------------------------------------------
    def load_weights(self, checkpoint: Checkpoint) -> None:
        """Copy this rank's slice of every weight from ``checkpoint``; DataFormatError naming a missing or
        misshapen tensor."""
        names = self.model.global_names()
        stored = checkpoint.metadata.tensors
        expected = set(self.global_shapes)
        saved = {name for name, spec in stored.items() if spec.group == "model"}
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        if missing or unexpected:
            raise DataFormatError(
                f"{checkpoint.path}: model tensors do not match this model (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}); was it saved from another shape?"
            )
        with torch.no_grad():
            for local_name, param in self.model.named_parameters():
                name = names[local_name]
                if tuple(stored[name].shape) != self.global_shapes[name]:
                    raise DataFormatError(
                        f"{checkpoint.path}: tensor {name} has shape {tuple(stored[name].shape)}, "
                        f"this model's has {self.global_shapes[name]}; check --model-preset and "
                        "shape flags"
                    )
                param.copy_(
                    read_local_shard(checkpoint, name, tuple(param.shape), self.global_shapes[name], self.state)
                )

    def load_optimizer(
        self, checkpoint: Checkpoint, optimizer: MixedPrecisionOptimizer, state_json: Mapping[str, Any]
    ) -> None:
        """Restore the optimizer tensors of this rank's parameters (whatever layout saved them)."""
        names = self.model.global_names()
        params = {names[local]: param for local, param in self.model.named_parameters()}
        tensors: Dict[str, torch.Tensor] = {}
        for name, spec in checkpoint.metadata.tensors.items():
            if spec.group != "optimizer":
                continue
            kind, param_name = name[len(PREFIX) :].split("/", 1)
            if param_name not in params:
                continue  # another pipeline stage's parameter
            if kind == "step":
                tensors[name] = checkpoint.read_tensor(name)
            else:
                param = params[param_name]
                tensors[name] = read_local_shard(
                    checkpoint, name, tuple(param.shape), self.global_shapes[param_name], self.state
                )
        layout = {
            "tensor": self.state.tensor_model_parallel_size,
            "pipeline": self.state.pipeline_model_parallel_size,
            "data": self.state.data_parallel_size,
        }
        if checkpoint.metadata.parallel != layout:  # per-rank parameter counts belong to the saving layout
            state_json = {
                **state_json,
                "groups": [{k: v for k, v in group.items() if k != "num_params"} for group in state_json["groups"]],
            }
        optimizer.load_state_dict_tensors(tensors, state_json, names)

    def restore_rng(self, checkpoint: Checkpoint) -> bool:
        """Restore this rank's RNG state when the checkpoint has one for it (same layout); returns whether it did."""
        if f"rng_rank{self.state.rank}.safetensors" not in checkpoint.metadata.files:
            return False
        checkpoint.restore_rng(self.state.rank)
        return True
