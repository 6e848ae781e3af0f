"""This rank's part of the model for training: its pipeline chunks, one step's forward/backward over a
pipeline schedule, evaluation, and the tensors a checkpoint needs (global names and shapes).

One process is the degenerate case (one chunk holding the whole model, the no-pipelining schedule: forward
and backward of each micro-batch in turn), so the single-process trainer runs the same code as the
parallel one. With pipeline parallelism, chunk ``c`` of pipeline rank ``r`` is global stage
``c * PP + r`` (more than one chunk: the interleaved schedule).

The loss of a step is the mean of the micro-batches' mean losses (averaged over data parallelism), or with
``per_token=True`` (--calculate-per-token-loss, Megatron's meaning) the sum of every token loss of the
global batch divided by its number of non-masked tokens over all micro-batches and data-parallel ranks:
micro-batch ``m`` is weighted by ``tokens_m * DP / tokens_total`` instead of ``1 / micro-batches``.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

from megalign.config.layout import stage_layer_ranges
from megalign.config.model import ModelConfig, ModelOptions
from megalign.model import GPTModel
from megalign.model.decoder import PipelineStage
from megalign.parallel.pipeline import PipelineSpec, run_schedule, schedule_for, sum_tied_embedding_grads
from megalign.parallel.state import ParallelState
from megalign.training import batches

__all__ = ["ModelChunks"]

Batch = Dict[str, torch.Tensor]


class ModelChunks(nn.Module):
    """The model chunks this rank holds (an ``nn.ModuleList`` named ``chunks``) and how to run them."""

    def __init__(
        self,
        config: ModelConfig,
        options: ModelOptions,
        state: ParallelState,
        num_chunks: int,
        first_stage_layers: Optional[int] = None,
        last_stage_layers: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.config, self.state = config, state
        self.spec = PipelineSpec(
            state.pipeline_model_parallel_size,
            state.pipeline_model_parallel_rank,
            state.pipeline_ranks,
            num_chunks,
            state.pipeline_group,
        )
        ranges = stage_layer_ranges(config.num_layers, self.spec.num_stages, first_stage_layers, last_stage_layers)
        seed = torch.initial_seed()
        chunks = []
        for chunk in range(num_chunks):
            stage = self.spec.stage(chunk)
            torch.manual_seed(seed)  # every chunk derives its weights from the run's seed (see GPTModel)
            chunks.append(
                GPTModel(
                    config,
                    state.context,
                    options,
                    PipelineStage(ranges[stage], first=stage == 0, last=stage == self.spec.num_stages - 1),
                )
            )
        self.chunks = nn.ModuleList(chunks)

    @property
    def models(self) -> List[GPTModel]:
        """The chunks as the GPTModels they are (ModuleList items are typed as plain modules)."""
        return [cast(GPTModel, chunk) for chunk in self.chunks]

    # ---- names and shapes ----------------------------------------------------------------------------
    def global_names(self) -> Dict[str, str]:
        """This module's parameter names (``chunks.1.layers.5.…``) -> global model names (``layers.5.…``)."""
        return {name: name.split(".", 2)[2] for name, _ in self.named_parameters()}

    def model_state(self) -> Dict[str, torch.Tensor]:
        """This rank's weights (its tensor-parallel shards) under global names."""
        names = self.global_names()
        return {names[name]: param.detach() for name, param in self.named_parameters()}

    def global_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shape of every parameter of the whole, unsplit model (built on the meta device: no memory)."""
        with torch.device("meta"):
            full = GPTModel(self.config)
        return {name: tuple(param.shape) for name, param in full.named_parameters()}

    # ---- running a step --------------------------------------------------------------------------------
    def _forward_step(
        self,
        micro: Sequence[Batch],
        device: torch.device,
        loss_transform: Callable[[torch.Tensor], torch.Tensor],
        raw_losses: List[torch.Tensor],
        weights: Optional[Sequence[float]],
    ) -> Callable[[int, Optional[torch.Tensor], int], torch.Tensor]:
        def forward_step(chunk: int, x: Optional[torch.Tensor], m: int) -> torch.Tensor:
            model = cast(GPTModel, self.chunks[chunk])  # once per micro-batch: no list of all chunks
            out = model(**batches.model_inputs(micro[m], device), hidden_states=x)
            if not model.stage.last:
                return out
            loss = out.float() / len(micro) if weights is None else out.float() * weights[m]
            raw_losses.append(loss.detach())
            return loss_transform(loss)

        return forward_step

    def loss_weights(self, micro: Sequence[Batch], per_token: bool, device: torch.device) -> List[float]:
        """Each micro-batch's weight in the step's loss: ``1 / len(micro)``, or with ``per_token``
        ``tokens_m * DP / tokens_total`` (non-masked tokens; the total all-reduced over data parallelism)."""
        if not per_token:
            return [1.0 / len(micro)] * len(micro)
        counts = [
            int(batch["loss_mask"].sum()) if "loss_mask" in batch else int((batch["labels"] != -100).sum())
            for batch in micro
        ]
        total = torch.tensor(float(sum(counts)), dtype=torch.float64, device=device)
        if self.state.data_group is not None:
            dist.all_reduce(total, group=self.state.data_group)
        scale = self.state.data_parallel_size / max(float(total.item()), 1.0)
        return [count * scale for count in counts]

    def _activation_shape(self, micro: Sequence[Batch]) -> Tuple[int, ...]:
        batch, seq = micro[0]["tokens"].shape
        if self.state.sequence_parallel:
            seq //= self.state.tensor_model_parallel_size
        return batch, seq, self.config.hidden_size

    def train_step(
        self,
        micro: Sequence[Batch],
        device: torch.device,
        dtype: torch.dtype,
        scale_loss: Callable[[torch.Tensor], torch.Tensor],
        backward_context: Callable[[bool], ContextManager[None]],
        per_token: bool = False,
    ) -> torch.Tensor:
        """Forward and backward of one global batch's micro-batches on this rank; the gradients accumulate.

        Returns the mean loss over the micro-batches (data-parallel ranks averaged), or the per-token loss
        with ``per_token`` (module doc), on the last pipeline stage, NaN on the others. ``scale_loss`` applies
        the loss scale; ``backward_context(is_last)`` wraps each backward pass (no gradient reduction before
        the last).
        """
        raw: List[torch.Tensor] = []
        actions = schedule_for(self.spec, len(micro))
        weights = self.loss_weights(micro, True, device) if per_token else None
        run_schedule(
            self.spec,
            actions,
            self._forward_step(micro, device, scale_loss, raw, weights),
            len(micro),
            self._activation_shape(micro),
            dtype,
            device,
            backward_context=backward_context,
        )
        sum_tied_embedding_grads(list(self.chunks), self.state.embedding_group)
        return self._data_parallel_mean(raw, device)

    @torch.no_grad()
    def evaluate(
        self, micro: Sequence[Batch], device: torch.device, dtype: torch.dtype, per_token: bool = False
    ) -> torch.Tensor:
        """Mean loss over ``micro`` (data-parallel ranks averaged; per token with ``per_token``) on the last
        stage, NaN elsewhere."""
        raw: List[torch.Tensor] = []
        actions = [a for a in schedule_for(self.spec, len(micro)) if a.kind == "F"]
        weights = self.loss_weights(micro, True, device) if per_token else None
        run_schedule(
            self.spec,
            actions,
            self._forward_step(micro, device, lambda loss: loss, raw, weights),
            len(micro),
            self._activation_shape(micro),
            dtype,
            device,
            forward_only=True,
        )
        return self._data_parallel_mean(raw, device)

    def _data_parallel_mean(self, raw: List[torch.Tensor], device: torch.device) -> torch.Tensor:
        if not raw:
            return torch.tensor(float("nan"), device=device)
        total = torch.stack(raw).sum()
        if self.state.data_group is not None:
            dist.all_reduce(total, group=self.state.data_group)
            total = total / self.state.data_parallel_size
        return total

    def layers(self) -> List[nn.Module]:
        """Every decoder layer this rank holds (for per-layer torch.compile)."""
        return [layer for chunk in self.models for layer in chunk.layers.values()]
