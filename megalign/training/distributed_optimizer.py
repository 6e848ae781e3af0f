"""The distributed optimizer (ZeRO-1, Megatron's --use-distributed-optimizer): optimizer state sharded over DP.

Each data-parallel rank owns ``1/DP`` of every gradient bucket (a contiguous slice of the flattened
buffer, see :mod:`megalign.parallel.data_parallel`) and keeps fp32 master weights and Adam moments only for
the parameter elements in its slices. A step:

1. reduce-scatter the gradient buckets (optionally overlapped with backward): this rank's slices hold the
   DP-averaged gradients;
2. unscale and check the shard; the NaN/Inf flag and the squared norm are reduced over the DP group and the
   model-parallel groups, so every rank skips, or clips by the same global norm;
3. AdamW (torch's fused kernel) over the shard: the per-element math of the unsharded optimizer;
4. all-gather the updated shards into the model parameters (cast to the model dtype, bucket by bucket).

For an fp32 model the shard's master *is* a view into the parameter (no copy). Per rank, the fp32 optimizer
state is about ``1/DP`` of :class:`~megalign.training.optimizer.MixedPrecisionOptimizer`'s (plus at most
``DP - 1`` padding elements per bucket, which hold no state); the fp32 gradient buffer stays full size.

Checkpoints are layout-independent: :meth:`DistributedOptimizer.state_dict_tensors` gathers FULL tensors
with the same global names as the unsharded optimizer, and :meth:`load_state_dict_tensors` takes full
tensors and keeps this rank's slice, so a DP=2 distributed-optimizer checkpoint resumes as DP=1 plain and
vice versa. The cost: gathering materialises the full fp32 masters and moments on every rank (``12 x
params`` bytes for a bf16 model) and moves them over the network at save time. :func:`build_optimizer`
picks the optimizer from the flags.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalign.config.sections import OptimizationSection, ParallelSection
from megalign.training.optimizer import _MOMENTS, PREFIX, MixedPrecisionOptimizer, ParamPair

__all__ = ["DistributedOptimizer", "build_optimizer"]


class DistributedOptimizer(MixedPrecisionOptimizer):
    """:class:`MixedPrecisionOptimizer` with masters and moments sharded over ``data_parallel_group``.

    Same constructor, :meth:`from_config`, per-iteration use and checkpoint API. After :meth:`step`, only
    this rank's shard of ``param.main_grad`` holds averaged gradients (see :meth:`main_grads`).
    """

    SHARDED = True

    def _make_pair(self, name: str, param: nn.Parameter) -> Optional[ParamPair]:
        """This rank's slice of ``param`` (None when its elements all belong to other ranks)."""
        part = self.grads.local_range(param)
        if part is None:
            return None
        flat = param.detach().view(-1)[part[0] : part[1]]
        master = flat if param.dtype == torch.float32 else flat.clone().float()
        return ParamPair(name, param, master, part)

    def _publish_params(self) -> None:
        """All-gather every rank's updated shard into the model parameters."""
        local = {id(pair.model_param): pair.master_param for pair in self.pairs}
        for slot, flat in self.grads.all_gather(local):
            slot.param.detach().view(-1).copy_(flat)

    def state_dict_tensors(self, param_names: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
        """FULL optimizer tensors (every DP rank gets all of them), named as :class:`MixedPrecisionOptimizer`'s.

        A collective: every rank of the data-parallel group must call it. Returns fresh copies.
        """
        names = self._names(param_names)
        device = self.grads.buffers[0].data.device
        state = {id(pair.model_param): self.inner.state.get(pair.master_param, {}) for pair in self.pairs}
        step = max((float(entry["step"]) for entry in state.values() if "step" in entry), default=-1.0)
        step_tensor = torch.tensor([step], dtype=torch.float64, device=device)
        if self.grads.group is not None:  # ranks whose shard is empty learn whether there is state
            dist.all_reduce(step_tensor, op=dist.ReduceOp.MAX, group=self.grads.group)
        keys = [key for key in _MOMENTS if step_tensor.item() >= 0]
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
        if step_tensor.item() >= 0:
            for own, _ in self.named_params:  # every master steps together, so one count serves all
                tensors[f"{PREFIX}step/{names[own]}"] = torch.tensor(
                    step_tensor.item(), dtype=torch.float32, device=device
                )
        return tensors


def build_optimizer(
    model: nn.Module, optimization: OptimizationSection, parallel: ParallelSection, state: Any = None
) -> MixedPrecisionOptimizer:
    """The run's optimizer: :class:`DistributedOptimizer` with --use-distributed-optimizer, else
    :class:`MixedPrecisionOptimizer` (``state``: the ParallelState, None for one process)."""
    cls = DistributedOptimizer if parallel.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls.from_config(model, optimization, parallel, state)
