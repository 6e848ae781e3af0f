"""The trainer's checkpoint component: what a training checkpoint holds, written from one process or from
every rank of a parallel job, and read back into this rank's model chunks and optimizer at any layout.

Tensors are stored under global names (``layers.17.mlp.up_proj.weight``, ``optimizer.exp_avg/<name>``).
One process writes with :func:`~megalign.checkpoint.storage.save_checkpoint` (optionally from a
background thread, ``--async-save``); a parallel job with
:func:`~megalign.checkpoint.sharded.save_sharded_checkpoint`. Reading always goes through
:func:`~megalign.checkpoint.sharded.read_local_shard`, so a checkpoint saved at any (TP, PP, DP)
layout, with or without the distributed optimizer, loads at any other.

With the distributed optimizer every data-parallel rank writes only its own flat slices of the optimizer
state (nothing is gathered); on loading, each rank reads, per parameter, only the flat range of its
TP-local tensor that it owns now (the whole TP-local tensor for the plain optimizer). Vocabulary tensors
(``VOCAB_TENSORS``) may have more or fewer padded rows than this model: shared rows are copied, the
model's extra rows are zero (weights and optimizer state), extra stored rows are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from megalign.checkpoint.async_save import AsyncCheckpointSaver
from megalign.checkpoint.format import iter_dir_name, vocab_rows_may_differ
from megalign.checkpoint.sharded import read_local_shard, save_sharded_checkpoint
from megalign.checkpoint.storage import Checkpoint, save_checkpoint
from megalign.config.sections import CheckpointingSection
from megalign.errors import ConfigError, DataFormatError
from megalign.parallel.state import ParallelState
from megalign.training.distributed_optimizer import DistributedOptimizer
from megalign.training.model_chunks import ModelChunks
from megalign.training.optimizer import _MOMENTS, PREFIX, MixedPrecisionOptimizer

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
    def _optimizer_shapes(self, names: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
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
        optimizer.finish_param_gather()  # the parameters must be complete before they are read
        model_state = self.model.model_state()
        names = self.model.global_names()
        metadata: Dict[str, Any] = dict(
            config=config, consumed_samples=consumed_samples, extra=extra, keep_last=keep_last
        )
        sharded = isinstance(optimizer, DistributedOptimizer) and self.async_saver is None
        if sharded:  # each data-parallel rank writes its own slices: nothing is gathered
            assert isinstance(optimizer, DistributedOptimizer)
            shards, optimizer_state = optimizer.state_dict_shards(names)  # a collective (one scalar)
            metadata.update(optimizer_shards=shards, bucket_layout=optimizer.bucket_layout())
        else:
            optimizer_state = optimizer.state_dict_tensors(names)
            shards = {}
        if self.state.world_size > 1 or sharded:
            shapes = {**self.global_shapes, **self._optimizer_shapes({**optimizer_state, **shards})}
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
        misshapen tensor (vocabulary tensors may differ in rows: see the module doc)."""
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
                shape, ours = tuple(stored[name].shape), self.global_shapes[name]
                if shape != ours and not (vocab_rows_may_differ(name) and shape[1:] == ours[1:]):
                    raise DataFormatError(
                        f"{checkpoint.path}: tensor {name} has shape {shape}, this model's has {ours}; "
                        "check --model-preset and shape flags"
                    )
                param.copy_(read_local_shard(checkpoint, name, tuple(param.shape), ours, self.state))

    def load_optimizer(
        self, checkpoint: Checkpoint, optimizer: MixedPrecisionOptimizer, state_json: Mapping[str, Any]
    ) -> None:
        """Restore the optimizer state of this rank's parameters, whatever layout and optimizer saved it,
        reading only what this rank's optimizer holds (its flat ranges, or whole TP-local tensors)."""
        names = self.model.global_names()
        stored = checkpoint.metadata.tensors
        tensors: Dict[str, torch.Tensor] = {}
        for pair in optimizer.pairs:
            name, param = names[pair.name], pair.model_param
            for key in ("master", *_MOMENTS):
                tensor_name = f"{PREFIX}{key}/{name}"
                if tensor_name in stored and (key != "master" or pair.separate_master):
                    tensors[tensor_name] = read_local_shard(
                        checkpoint,
                        tensor_name,
                        tuple(param.shape),
                        self.global_shapes[name],
                        self.state,
                        flat_range=pair.param_range,
                    )
            if f"{PREFIX}step/{name}" in stored:
                tensors[f"{PREFIX}step/{name}"] = checkpoint.read_tensor(f"{PREFIX}step/{name}")
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
        optimizer.load_state_dict_tensors(tensors, state_json, names, take_ownership=True)

    def restore_rng(self, checkpoint: Checkpoint) -> bool:
        """Restore this rank's RNG state when the checkpoint has one for it (same layout); returns whether it did."""
        if f"rng_rank{self.state.rank}.safetensors" not in checkpoint.metadata.files:
            return False
        checkpoint.restore_rng(self.state.rank)
        return True
