"""The distributed optimizer (ZeRO-1, Megatron's --use-distributed-optimizer): optimizer state sharded over DP.

Each data-parallel rank owns ``1/DP`` of every gradient bucket (a contiguous slice of the flattened
buffer, see :mod:`megalign.parallel.data_parallel`) and keeps fp32 master weights and Adam moments only for
the parameter elements in its slices. A step:

1. reduce-scatter the gradient buckets (optionally overlapped with backward): this rank's slices hold the
   DP-averaged gradients;
2. unscale and check the shard; the NaN/Inf flag and the squared norm are reduced over the DP group and the
   model-parallel groups, so every rank skips, or clips by the same global norm;
3. AdamW (torch's fused kernel) over the shard: the per-element math of the unsharded optimizer;
4. all-gather the updated shards into the model parameters (cast to the model dtype, bucket by bucket); with
   --overlap-param-gather the gathers stay in flight and each bucket's is waited for by a forward pre-hook of
   the first module that uses one of its parameters, so they overlap the next forward pass.

For an fp32 model the shard's master *is* a view into the parameter (no copy). Per rank, the fp32 optimizer
state is about ``1/DP`` of :class:`~megalign.training.optimizer.MixedPrecisionOptimizer`'s (plus at most
``DP - 1`` padding elements per bucket, which hold no state); the fp32 gradient buffer stays full size.

Checkpoints are sharded and layout-independent, and nothing is gathered to write them:
:meth:`DistributedOptimizer.state_dict_shards` hands over, as views, only this rank's flat slices of the
fp32 masters and moments (with their TP-local offsets and buckets, :class:`~megalign.checkpoint.sharded.FlatShard`)
plus the step counts, and every data-parallel rank writes its own ``optim_tp{t}_pp{p}_dp{d}`` file (format
version 2, flat-sharded tensors). Loading at any layout, with either optimizer, reads only the stored
slices each rank owns now (:mod:`megalign.training.checkpoint_io`), so per rank save and load memory stays
about its shard plus one parameter's rows. :meth:`state_dict_tensors` still gathers FULL tensors, named as
the unsharded optimizer's (an all-gather of ``12 x params`` bytes on every rank: for tests and small
models, not for checkpoints); :meth:`load_state_dict_tensors` takes full tensors or this rank's flat
shards. :func:`build_optimizer` picks the optimizer from the flags.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

from megalign.checkpoint.format import dtype_name
from megalign.checkpoint.sharded import FlatShard
from megalign.config.sections import OptimizationSection, ParallelSection
from megalign.training.optimizer import _MOMENTS, PREFIX, MixedPrecisionOptimizer, ParamPair

__all__ = ["DistributedOptimizer", "build_optimizer"]


class DistributedOptimizer(MixedPrecisionOptimizer):
    """:class:`MixedPrecisionOptimizer` with masters and moments sharded over ``data_parallel_group``.

    Same constructor, :meth:`from_config`, per-iteration use and checkpoint API. After :meth:`step`, only
    this rank's shard of ``param.main_grad`` holds averaged gradients (see :meth:`main_grads`).
    """

    SHARDED = True

    def enable_param_gather_overlap(self, model: nn.Module) -> None:
        """--overlap-param-gather: after a step, each bucket's parameter all-gather stays in flight until the next
        forward pass reaches a module owning one of its parameters (a forward pre-hook waits for it there), so
        the gathers of later layers overlap the forward of earlier ones, as in Megatron."""
        bucket_of = {id(slot.param): id(slot.bucket) for slot in (self.grads.slot(p) for _, p in self.named_params)}
        for module in model.modules():
            buckets = {bucket_of[id(p)] for p in module.parameters(recurse=False) if id(p) in bucket_of}
            if buckets:
                self._gather_hooks.append(
                    module.register_forward_pre_hook(lambda _module, _args, ids=frozenset(buckets): self._wait(ids))
                )
        self.overlap_param_gather = True

    def _wait(self, bucket_ids: Any) -> None:
        """Finish the in-flight parameter gathers of ``bucket_ids`` (all of them for None)."""
        for key in list(self._pending_gathers) if bucket_ids is None else bucket_ids:
            gather = self._pending_gathers.pop(key, None)
            if gather is not None:
                gather.finish()

    def finish_param_gather(self) -> None:
        """Wait for every parameter all-gather still in flight (before reading the parameters outside a forward
        pass: a checkpoint save, the next step)."""
        self._wait(None)

    def _make_pair(self, name: str, param: nn.Parameter) -> Optional[ParamPair]:
        """This rank's slice of ``param`` (None when its elements all belong to other ranks)."""
        part = self.grads.local_range(param)
        if part is None:
            return None
        flat = param.detach().view(-1)[part[0] : part[1]]
        master = flat if param.dtype == torch.float32 else flat.clone().float()
        return ParamPair(name, param, master, part)

    def _publish_params(self) -> None:
        """All-gather every rank's updated shard into the model parameters (left in flight with
        :meth:`enable_param_gather_overlap`)."""
        local = {id(pair.model_param): pair.master_param for pair in self.pairs}
        if self.overlap_param_gather:  # step() has finished the previous gathers
            self._pending_gathers = {id(g.bucket): g for g in self.grads.start_param_gather(local)}
            return
        for slot, flat in self.grads.all_gather(local):
            slot.param.detach().view(-1).copy_(flat)

    def _global_step(self) -> float:
        """The AdamW step count (-1.0 before the first step), agreed over the data-parallel group (a collective:
        ranks whose shard is empty learn whether there is state)."""
        state = [self.inner.state.get(pair.master_param, {}) for pair in self.pairs]
        step = max((float(entry["step"]) for entry in state if "step" in entry), default=-1.0)
        step_tensor = torch.tensor([step], dtype=torch.float64, device=self.grads.buffers[0].data.device)
        if self.grads.group is not None:
            dist.all_reduce(step_tensor, op=dist.ReduceOp.MAX, group=self.grads.group)
        return float(step_tensor.item())

    def _step_tensors(self, names: Mapping[str, str], step: float) -> Dict[str, torch.Tensor]:
        """0-d step counts of every parameter (every master steps together, so one count serves all)."""
        if step < 0:
            return {}
        device = self.grads.buffers[0].data.device
        return {
            f"{PREFIX}step/{names[own]}": torch.tensor(step, dtype=torch.float32, device=device)
            for own, _ in self.named_params
        }

    def state_dict_shards(
        self, param_names: Optional[Mapping[str, str]] = None
    ) -> Tuple[Dict[str, FlatShard], Dict[str, torch.Tensor]]:
        """This rank's checkpoint state, nothing gathered: ``(flat shards, step counts)``.

        The flat shards are live views of this rank's masters (when separate) and moments, named as
        :meth:`state_dict_tensors`'s, each with its flat range of the TP-local parameter and its bucket;
        save them before the next :meth:`step`. A collective over the data-parallel group (one scalar).
        """
        names = self._names(param_names)
        step = self._global_step()
        bucket_index = {id(bucket): index for index, bucket in enumerate(self.grads.buckets)}
        shards: Dict[str, FlatShard] = {}
        for pair in self.pairs:
            assert pair.param_range is not None  # every pair of the distributed optimizer is a flat shard
            start, stop = pair.param_range
            slot = self.grads.slot(pair.model_param)
            entry = self.inner.state.get(pair.master_param, {})
            owned = {"master": pair.master_param} if pair.separate_master else {}
            owned.update({key: entry[key] for key in _MOMENTS if key in entry})
            for key, tensor in owned.items():
                shards[f"{PREFIX}{key}/{names[pair.name]}"] = FlatShard(
                    tensor.detach(),
                    tuple(pair.model_param.shape),
                    start,
                    stop,
                    bucket_index[id(slot.bucket)],
                    slot.start + start - slot.bucket.start,
                )
        return shards, self._step_tensors(names, step)

    def bucket_layout(self) -> List[Dict[str, Any]]:
        """This rank's gradient buckets for the checkpoint metadata: index, parameter dtype, element range in
        its buffer, and the range this rank owns."""
        return [
            {
                "index": index,
                "dtype": dtype_name(bucket.buffer.param_dtype),
                "range": [bucket.start, bucket.end],
                "shard": list(bucket.shard_range(self.grads.dp_rank)),
            }
            for index, bucket in enumerate(self.grads.buckets)
        ]

    def state_dict_tensors(self, param_names: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
        """FULL optimizer tensors (every DP rank gets all of them), named as :class:`MixedPrecisionOptimizer`'s.

        A collective: every rank of the data-parallel group must call it. Returns fresh copies. It
        materialises the whole fp32 state on every rank: checkpoints use :meth:`state_dict_shards`.
        """
        names = self._names(param_names)
        state = {id(pair.model_param): self.inner.state.get(pair.master_param, {}) for pair in self.pairs}
        step = self._global_step()
        keys = [key for key in _MOMENTS if step >= 0]
        if any(param.dtype != torch.float32 for _, param in self.named_params):
            keys.insert(0, "master")
        tensors: Dict[str, torch.Tensor] = {}
        for key in keys:
            if key == "master":
                local = {id(pair.model_param): pair.master_param for pair in self.pairs}
            else:
                local = {ident: entry[key] for ident, entry in state.items() if key in entry}
            for slot, flat in self.grads.all_gather(local, torch.float32):
                if key != "master" or slot.param.dtype != torch.float32:
                    tensors[f"{PREFIX}{key}/{names[slot.name]}"] = flat.view(slot.param.shape).clone()
        tensors.update(self._step_tensors(names, step))
        return tensors


def build_optimizer(
    model: nn.Module, optimization: OptimizationSection, parallel: ParallelSection, state: Any = None
) -> MixedPrecisionOptimizer:
    """The run's optimizer: :class:`DistributedOptimizer` with --use-distributed-optimizer (overlapping its
    parameter all-gather with the forward pass with --overlap-param-gather), else
    :class:`MixedPrecisionOptimizer` (``state``: the ParallelState, None for one process)."""
    if not parallel.use_distributed_optimizer:
        return MixedPrecisionOptimizer.from_config(model, optimization, parallel, state)
    optimizer = cast(DistributedOptimizer, DistributedOptimizer.from_config(model, optimization, parallel, state))
    if parallel.overlap_param_gather:
        optimizer.enable_param_gather_overlap(model)
    return optimizer
