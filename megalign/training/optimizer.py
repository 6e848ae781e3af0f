"""Mixed-precision AdamW: fp32 master weights and fp32 gradient accumulation (Megatron Float16Optimizer idea).

:class:`MixedPrecisionOptimizer` keeps, for every trainable model parameter, an fp32 *master* copy (for an
fp32 model the master **is** the parameter: no copy) and an fp32 ``main_grad`` buffer, attached to the
model parameter as ``param.main_grad``. A post-accumulate-grad hook on each model parameter adds the
freshly computed ``.grad`` (bf16/fp16/fp32) into ``main_grad`` and frees ``.grad``, so gradients of several
micro-batches are summed in fp32 without the trainer doing anything between backward passes.
:meth:`step` unscales and checks the main grads through the loss scaler (with nothing to unscale, the
global norm's finiteness is the check), skips the update on NaN/Inf, clips by the global L2 norm, runs
``torch.optim.AdamW`` (its fused kernel) over the masters and copies them back into the model parameters
(cast to the model dtype).

The ``main_grad`` buffers are views into contiguous per-dtype buffers of
:class:`megalign.parallel.data_parallel.DataParallelGrads`, which also averages them over the data-parallel
group (``data_parallel_group``; all-reduce, optionally overlapped with backward). With model parallelism the
global norm, the NaN/Inf decision and the zero count are reduced over ``model_parallel_groups`` (the TP and
PP groups), so every rank takes the same decision. Convention for parameters replicated across tensor
parallel ranks: a parameter whose ``tensor_parallel_axis`` attribute is None or missing is replicated and
counted in the norm only on tensor-parallel rank 0; TP-split parameters set it to 0 or 1.

The list :attr:`MixedPrecisionOptimizer.pairs` of :class:`ParamPair` (model param, master param, name,
element range) is the one seam the sharded :class:`~megalign.training.distributed_optimizer.DistributedOptimizer`
replaces: its masters cover only this rank's shard. Checkpoint tensors are flat and name-keyed:
``optimizer.master/<name>`` (only when the master is a separate copy), ``optimizer.exp_avg/<name>``,
``optimizer.exp_avg_sq/<name>`` and ``optimizer.step/<name>`` (0-d fp32). :meth:`load_state_dict_tensors`
takes each tensor either parameter-shaped or as exactly the part a pair covers (the flat shard a
distributed-optimizer rank reads from a checkpoint, see :mod:`megalign.training.checkpoint_io`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megalign.config.sections import OptimizationSection, ParallelSection
from megalign.errors import ConfigError, DataFormatError
from megalign.parallel.data_parallel import DataParallelGrads
from megalign.training.loss_scale import LossScaler

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
PREFIX = "optimizer."
_MOMENTS = ("exp_avg", "exp_avg_sq")


# Megatron's is_embedding_or_output_parameter: the input embedding table and the output layer (LM head).
EMBEDDING_OR_OUTPUT = ("embed_tokens.weight", "lm_head.weight")


def is_embedding_or_output(name: str) -> bool:
    """Whether parameter ``name`` is the word embedding or the output layer (the --decoupled-lr params)."""
    return name in EMBEDDING_OR_OUTPUT or name.endswith(tuple("." + suffix for suffix in EMBEDDING_OR_OUTPUT))


def param_groups_for(
    model: nn.Module,
    weight_decay: float,
    decoupled_lr: Optional[float] = None,
    decoupled_min_lr: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Megatron's grouping: biases and 1-D params (norm weights) get no weight decay, the rest do.

    Returns up to two groups (empty ones left out), each ``{"params", "names", "weight_decay", "lr_mult",
    "wd_mult"}``: the decay group has ``wd_mult=1``, the no-decay group ``wd_mult=0`` (so
    ``LRSchedule.apply`` keeps its decay at 0); both have ``lr_mult=1``. With ``decoupled_lr``
    (--decoupled-lr) the embedding and output-layer weights (:func:`is_embedding_or_output`) go to groups of
    their own with ``max_lr=decoupled_lr`` and, if given, ``min_lr=decoupled_min_lr`` (Megatron's
    ``_get_param_groups``), up to four groups. Frozen params are left out; tied params appear once.
    """
    groups: Dict[Tuple[bool, bool], Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_wd = param.dim() == 1 or name.endswith(".bias")
        decoupled = decoupled_lr is not None and is_embedding_or_output(name)
        group = groups.get((no_wd, decoupled))
        if group is None:
            group = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_wd else float(weight_decay),
                "lr_mult": 1.0,
                "wd_mult": 0.0 if no_wd else 1.0,
            }
            if decoupled_lr is not None and decoupled:
                group["max_lr"] = float(decoupled_lr)
                if decoupled_min_lr is not None:
                    group["min_lr"] = float(decoupled_min_lr)
            groups[(no_wd, decoupled)] = group
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[1], key[0]))]


@dataclass
class ParamPair:
    """One trainable parameter: the model's tensor, its fp32 master, its name, and the element range.

    ``param_range`` is None when the master covers the whole parameter (for an fp32 model the master then
    *is* the parameter), or ``(a, b)``: the master is 1-D and holds flattened elements ``a:b`` (a shard of
    the distributed optimizer; for an fp32 model a view into the parameter).
    """

    name: str
    model_param: nn.Parameter
    master_param: torch.Tensor
    param_range: Optional[Tuple[int, int]] = None

    @property
    def separate_master(self) -> bool:
        """True when the master is an fp32 copy of a bf16/fp16 model parameter."""
        return self.model_param.dtype != torch.float32

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` that this pair's master covers: ``tensor`` is parameter-shaped (full), or
        already that part (a flat shard read from a checkpoint), which is returned as it is."""
        if self.param_range is None or tuple(tensor.shape) != tuple(self.model_param.shape):
            return tensor
        start, end = self.param_range
        return tensor.reshape(-1)[start:end]

    @property
    def main_grad(self) -> torch.Tensor:
        """The fp32 accumulated gradient of the elements this pair covers."""
        grad: torch.Tensor = getattr(self.model_param, "main_grad")  # noqa: B009 - attached at run time (DataParallelGrads)
        return self.take(grad)


@dataclass
class StepResult:
    """Outcome of one :meth:`MixedPrecisionOptimizer.step`.

    ``grad_norm`` is the global L2 norm of the unscaled gradients before clipping (None when skipped);
    ``num_zeros`` counts zero gradient elements when the optimizer was built with ``count_zeros=True``.
    """

    skipped: bool
    grad_norm: Optional[float]
    num_zeros: Optional[int] = None


def parallel_kwargs(parallel: Any) -> Dict[str, Any]:
    """Constructor keywords for the groups of a :class:`~megalign.parallel.state.ParallelState` (None: single)."""
    if parallel is None:
        return {}
    return {
        "data_parallel_group": parallel.data_group,
        "model_parallel_groups": (parallel.tensor_group, parallel.pipeline_group),
        "tensor_parallel_rank": parallel.tensor_model_parallel_rank,
    }


class MixedPrecisionOptimizer:
    """AdamW over fp32 master weights with fp32 gradient accumulation, loss-scale handling and clipping.

    Use per iteration: ``opt.zero_grad()``; for each micro-batch ``scaler.scale(loss).backward()`` (every
    micro-batch but the last inside ``with opt.no_sync():`` when ``overlap_grad_reduce``); then
    ``result = opt.step(scaler)``. Call :meth:`close` before building another optimizer over the same model.

    ``data_parallel_group``: gradients are averaged over it (None: one data-parallel rank); ``bucket_size``
    (elements) and ``overlap_grad_reduce`` as in :class:`~megalign.parallel.data_parallel.DataParallelGrads`.
    ``model_parallel_groups`` (None entries ignored): the groups whose ranks hold different parts of the model
    (TP, PP); the squared norm, NaN/Inf flag and zero count are summed over each in turn.
    ``tensor_parallel_rank`` decides which copy of a TP-replicated parameter is counted (see module doc).
    """

    SHARDED = False  # the distributed optimizer shards masters and moments over the data-parallel group

    def __init__(
        self,
        param_groups: Sequence[Mapping[str, Any]],
        *,
        lr: float,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_grad: float = 0.0,
        count_zeros: bool = False,
        data_parallel_group: Optional[Any] = None,
        bucket_size: Optional[int] = None,
        overlap_grad_reduce: bool = False,
        model_parallel_groups: Sequence[Optional[Any]] = (),
        tensor_parallel_rank: int = 0,
        grad_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ConfigError(f"--lr {lr} must be a finite number >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"--adam-beta1/--adam-beta2 {betas} must be in [0, 1)")
        if not eps > 0.0:
            raise ConfigError(f"--adam-eps {eps} must be > 0")
        if not (math.isfinite(clip_grad) and clip_grad >= 0.0):
            raise ConfigError(f"--clip-grad {clip_grad} must be >= 0 (0 disables clipping)")
        if bucket_size is not None and bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size {bucket_size} must be >= 1 (elements)")
        self.clip_grad = float(clip_grad)
        self.count_zeros = bool(count_zeros)
        self.tensor_parallel_rank = int(tensor_parallel_rank)
        self.pairs: List[ParamPair] = []
        self.named_params: List[Tuple[str, nn.Parameter]] = []  # every trainable parameter, in group order
        self._group_sizes: List[int] = []
        seen: set = set()
        for index, group in enumerate(param_groups):
            params, names = list(group["params"]), group.get("names")
            if names is None or len(names) != len(params):
                raise ValueError(
                    f"param group {index} needs a 'names' list as long as its 'params' "
                    "(build groups with param_groups_for)"
                )
            for name, param in zip(names, params):
                if not param.is_floating_point():
                    raise ValueError(
                        f"parameter {name} has dtype {param.dtype}; only floating-point params are trained"
                    )
                if id(param) in seen:
                    raise ValueError(f"parameter {name} appears twice in the param groups")
                seen.add(id(param))
                self.named_params.append((name, param))
            self._group_sizes.append(len(params))
        if not self.named_params:
            raise ConfigError("the model has no trainable parameters to optimize")
        self.overlap_param_gather = False  # the distributed optimizer's --overlap-param-gather
        self._pending_gathers: Dict[int, Any] = {}
        self._gather_hooks: List[Any] = []
        self.grads = DataParallelGrads(
            self.named_params,
            group=data_parallel_group,
            bucket_size=bucket_size,
            overlap_grad_reduce=overlap_grad_reduce,
            shard=self.SHARDED,
            grad_dtype=grad_dtype,
        )
        self._norm_groups = [
            group
            for group in ((data_parallel_group,) if self.SHARDED else ()) + tuple(model_parallel_groups)
            if group is not None
        ]
        master_groups = []
        try:
            for group in param_groups:
                made = [self._make_pair(name, param) for name, param in zip(group["names"], group["params"])]
                pairs = [pair for pair in made if pair is not None]
                self.pairs.extend(pairs)
                extra = {key: value for key, value in group.items() if key not in ("params", "names")}
                extra.setdefault("lr_mult", 1.0)
                extra.setdefault("wd_mult", 1.0)
                master_groups.append(
                    {"params": [pair.master_param for pair in pairs], "names": [pair.name for pair in pairs], **extra}
                )
        except BaseException:
            self.close()  # drop the main_grad buffers already attached
            raise
        # the fused kernel (one pass over all tensors) exists for CUDA and CPU; other devices use foreach
        fused = all(name_param[1].device.type in ("cuda", "cpu") for name_param in self.named_params)
        self.inner = torch.optim.AdamW(
            master_groups,
            lr=lr,
            betas=(betas[0], betas[1]),
            eps=eps,
            fused=True if fused else None,
            foreach=None if fused else True,
        )

    def _make_pair(self, name: str, param: nn.Parameter) -> Optional[ParamPair]:
        """The pair this rank optimizes for ``param``: here the whole parameter (fp32 master = the param)."""
        master = param if param.dtype == torch.float32 else param.detach().clone().float()
        return ParamPair(name, param, master)

    @classmethod
    def from_config(
        cls, model: nn.Module, optimization: OptimizationSection, parallel: ParallelSection, state: Any = None
    ) -> "MixedPrecisionOptimizer":
        """Build for ``model`` from a run's optimization section (lr, weight decay, AdamW betas and epsilon,
        clipping, --decoupled-lr) and parallel section (gradient buckets, overlap, --grad-reduce-in-bf16).
        ``state``: the run's ParallelState (its DP, TP and PP groups), None for one process."""
        opt = optimization
        if opt.lr is None:
            raise ConfigError("--lr is required")
        groups = param_groups_for(model, opt.weight_decay, opt.decoupled_lr, opt.decoupled_min_lr)
        return cls(
            groups,
            lr=opt.lr,
            betas=(opt.adam_beta1, opt.adam_beta2),
            eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bucket_size=parallel.ddp_bucket_size,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            grad_dtype=torch.bfloat16 if parallel.grad_reduce_in_bf16 else torch.float32,
            **parallel_kwargs(state),
        )

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The inner AdamW's groups (what ``LRSchedule.apply`` writes lr and weight_decay into)."""
        return self.inner.param_groups

    def main_grads(self) -> List[torch.Tensor]:
        """The fp32 accumulated gradients this rank optimizes, in :attr:`pairs` order (fp32 copies of the
        bf16 buffers with --grad-reduce-in-bf16)."""
        return [pair.main_grad.float() for pair in self.pairs]

    def no_sync(self) -> ContextManager[None]:
        """Context for every micro-batch's backward but the last: accumulate without communicating."""
        return self.grads.no_sync()

    def zero_grad(self) -> None:
        """Zero the fp32 accumulation buffers (start of an iteration) and drop any stray ``.grad``."""
        self.grads.zero()
        for _, param in self.named_params:
            param.grad = None
        for pair in self.pairs:
            pair.master_param.grad = None

    def state_numel(self) -> int:
        """fp32 elements this rank holds for optimizer state: separate masters plus Adam moments."""
        total = sum(pair.master_param.numel() for pair in self.pairs if pair.separate_master)
        for pair in self.pairs:
            total += sum(
                self.inner.state.get(pair.master_param, {}).get(key, torch.empty(0)).numel() for key in _MOMENTS
            )
        return total

    # ----- the step -----

    def step(self, loss_scaler: Optional[LossScaler] = None) -> StepResult:
        """Average gradients over data parallelism, unscale and check, skip on NaN/Inf on any rank (scaler
        updated either way), clip by the global norm, AdamW step, write the new weights into the model.

        Without a scaler the gradients are only checked for NaN/Inf.
        """
        self.finish_param_gather()
        self.grads.finish_grad_sync()
        grads = self.main_grads()
        for pair, grad in zip(self.pairs, grads):
            pair.master_param.grad = grad
        total_norm: Optional[torch.Tensor]
        if loss_scaler is None or loss_scaler.scale_value == 1.0:
            # nothing to unscale: the global norm (needed for clipping anyway) is finite iff every element is
            total_norm = self._global_norm(grads)
            found_inf = not bool(torch.isfinite(total_norm))
        else:
            found_inf = self._any_rank(loss_scaler.unscale_and_check(grads))
            total_norm = None if found_inf else self._global_norm(grads)
        if loss_scaler is not None:
            loss_scaler.update(found_inf)
        if found_inf or total_norm is None:
            for pair in self.pairs:
                pair.master_param.grad = None
            return StepResult(skipped=True, grad_norm=None)
        masters = [pair.master_param for pair in self.pairs]
        if self.clip_grad > 0.0 and masters:  # torch's rule: scale by min(1, clip / (norm + 1e-6)); x * 1.0 is exact
            torch.nn.utils.clip_grads_with_norm_(masters, self.clip_grad, total_norm)
        num_zeros = self._count_zeros(grads) if self.count_zeros else None
        self.inner.step()
        with torch.no_grad():
            for pair in self.pairs:
                pair.master_param.grad = None
            self._publish_params()
        return StepResult(skipped=False, grad_norm=float(total_norm.item()), num_zeros=num_zeros)

    def finish_param_gather(self) -> None:
        """Nothing is in flight here (see :class:`~megalign.training.distributed_optimizer.DistributedOptimizer`)."""

    def _publish_params(self) -> None:
        """Write the updated masters into the model parameters (cast to the model dtype)."""
        for pair in self.pairs:
            if pair.separate_master:
                pair.model_param.copy_(pair.master_param)

    def _counted(self, pair: ParamPair) -> bool:
        """Whether this rank's copy of ``pair`` counts in the global norm: TP-replicated params (attribute
        ``tensor_parallel_axis`` None or missing) count on TP rank 0 only; params whose shard is held by
        ``tensor_parallel_replicas`` consecutive TP ranks count on the first of them."""
        if getattr(pair.model_param, "tensor_parallel_axis", None) is None:
            return self.tensor_parallel_rank == 0
        return self.tensor_parallel_rank % getattr(pair.model_param, "tensor_parallel_replicas", 1) == 0

    def _reduce(self, value: torch.Tensor, op: Any) -> torch.Tensor:
        """All-reduce ``value`` over every group this optimizer's decisions span (in place; returned)."""
        for group in self._norm_groups:
            dist.all_reduce(value, op=op, group=group)
        return value

    def _global_norm(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """L2 norm of all gradients of the model, the same value on every rank."""
        if not self._norm_groups:
            return torch.nn.utils.get_total_norm(grads, 2.0)  # every gradient is here
        counted = [grad for pair, grad in zip(self.pairs, grads) if self._counted(pair) and grad.numel()]
        square = torch.zeros((), dtype=torch.float32, device=self.grads.buffers[0].data.device)
        if counted:
            square = torch.nn.utils.get_total_norm(counted, 2.0).float().square()
        return self._reduce(square, dist.ReduceOp.SUM).sqrt()

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is True on any rank of the groups."""
        if not self._norm_groups:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.grads.buffers[0].data.device)
        return bool(self._reduce(value, dist.ReduceOp.MAX).item() > 0)

    def _count_zeros(self, grads: List[torch.Tensor]) -> int:
        """Zero gradient elements over the whole model (replicated copies counted once)."""
        count = torch.zeros((), dtype=torch.float64, device=self.grads.buffers[0].data.device)
        for pair, grad in zip(self.pairs, grads):
            if not self._norm_groups or self._counted(pair):
                count += (grad == 0).sum()
        return int(self._reduce(count, dist.ReduceOp.SUM).item()) if self._norm_groups else int(count.item())

    def close(self) -> None:
        """Finish in-flight parameter gathers; remove the hooks and ``main_grad`` buffers from the parameters."""
        self.finish_param_gather()
        for hook in getattr(self, "_gather_hooks", []):
            hook.remove()
        self._gather_hooks = []
        grads = getattr(self, "grads", None)
        if grads is not None:
            grads.close()

    # ----- checkpoint state -----

    def _names(self, param_names: Optional[Mapping[str, str]]) -> Dict[str, str]:
        """Checkpoint name of every parameter: its own name, or ``param_names[name]`` (e.g. global layer numbers)."""
        if param_names is None:
            return {name: name for name, _ in self.named_params}
        missing = [name for name, _ in self.named_params if name not in param_names]
        if missing:
            raise ValueError(f"param_names lacks {len(missing)} parameters, e.g. {missing[:3]}")
        return {name: param_names[name] for name, _ in self.named_params}

    def state_dict_tensors(self, param_names: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
        """Flat name-keyed optimizer tensors for ``save_checkpoint(optimizer_state=...)``.

        ``param_names`` maps this optimizer's parameter names to checkpoint names (default: unchanged). The
        tensors are live (not copies): save them before the next :meth:`step`.
        """
        names = self._names(param_names)
        tensors: Dict[str, torch.Tensor] = {}
        for pair in self.pairs:
            name = names[pair.name]
            if pair.separate_master:
                tensors[f"{PREFIX}master/{name}"] = pair.master_param.detach()
            state = self.inner.state.get(pair.master_param, {})
            for key in (*_MOMENTS, "step"):
                if key in state:
                    tensors[f"{PREFIX}{key}/{name}"] = state[key].detach()
        return tensors

    def state_dict_json(self) -> Dict[str, Any]:
        """JSON-able hyper-parameters: per group lr, weight_decay, betas, eps, multipliers and member count."""
        groups = [
            {
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "betas": list(group["betas"]),
                "eps": group["eps"],
                "lr_mult": group["lr_mult"],
                "wd_mult": group["wd_mult"],
                "num_params": size,
            }
            for group, size in zip(self.inner.param_groups, self._group_sizes)
        ]
        return {"format": STATE_FORMAT, "kind": "adamw", "clip_grad": self.clip_grad, "groups": groups}

    def load_state_dict_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        state_json: Optional[Mapping[str, Any]] = None,
        param_names: Optional[Mapping[str, str]] = None,
        *,
        take_ownership: bool = False,
    ) -> None:
        """Restore :meth:`state_dict_tensors` (and optionally :meth:`state_dict_json`) output exactly.

        Each tensor is parameter-shaped, or just the part this rank's pair covers (then only tensors of
        this rank's pairs are needed). Masters are loaded and copied into the model params; moments and
        step counts replace the AdamW state (each rank keeps the part its pairs cover). Group lr and
        weight_decay come from ``state_json`` (the LR schedule rewrites them anyway); betas/eps stay as
        configured now. ``take_ownership``: keep the given moment tensors instead of copying them (the
        caller read them fresh). Raises DataFormatError naming missing, unexpected or misshapen tensors.
        """
        names = self._names(param_names)
        self._check_tensors(tensors, names)
        self._check_json(state_json)
        torch_state: Dict[str, Any] = {"state": {}, "param_groups": []}
        index = {id(pair.master_param): i for i, pair in enumerate(self.pairs)}
        pair_of = {id(pair.master_param): pair for pair in self.pairs}
        for number, group in enumerate(self.inner.param_groups):
            saved = state_json["groups"][number] if state_json is not None else {}
            torch_state["param_groups"].append(
                {
                    **{key: value for key, value in group.items() if key != "params"},
                    "lr": saved.get("lr", group["lr"]),
                    "weight_decay": saved.get("weight_decay", group["weight_decay"]),
                    "params": [index[id(master)] for master in group["params"]],
                }
            )
            for master in group["params"]:
                pair = pair_of[id(master)]
                name = names[pair.name]
                if f"{PREFIX}exp_avg/{name}" in tensors:
                    moments = {key: pair.take(tensors[f"{PREFIX}{key}/{name}"]).detach() for key in _MOMENTS}
                    if not take_ownership:
                        moments = {key: value.clone() for key, value in moments.items()}
                    torch_state["state"][index[id(master)]] = {
                        **moments,
                        "step": tensors[f"{PREFIX}step/{name}"].detach().clone(),
                    }
        self.inner.load_state_dict(torch_state)
        with torch.no_grad():
            for pair in self.pairs:
                if pair.separate_master:
                    pair.master_param.copy_(pair.take(tensors[f"{PREFIX}master/{names[pair.name]}"]))
            for name, param in self.named_params:  # full masters: every element known, no gather needed
                master = tensors.get(f"{PREFIX}master/{names[name]}")
                if param.dtype != torch.float32 and master is not None and master.shape == param.shape:
                    param.copy_(master)
            for pair in self.pairs:  # flat-shard masters: this rank's elements (the rest came with the weights)
                if pair.separate_master and pair.param_range is not None:
                    start, end = pair.param_range
                    pair.model_param.detach().view(-1)[start:end].copy_(pair.master_param)

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
        """DataFormatError naming missing, unexpected or misshapen optimizer tensors."""
        ours = {f"{PREFIX}{key}/{name}" for name in names.values() for key in (*_MOMENTS, "step", "master")}
        unexpected = sorted(key for key in tensors if key.startswith(PREFIX) and key not in ours)
        if unexpected:
            raise DataFormatError(
                f"the checkpoint has {len(unexpected)} optimizer tensors for parameters this "
                f"model lacks, e.g. {unexpected[:3]}; was it saved from a different model?"
            )
        with_state = any(f"{PREFIX}exp_avg/{name}" in tensors for name in names.values())
        required = [f"{PREFIX}master/{names[pair.name]}" for pair in self.pairs if pair.separate_master]
        if with_state:
            required += [f"{PREFIX}{key}/{names[pair.name]}" for pair in self.pairs for key in (*_MOMENTS, "step")]
        missing = [key for key in required if key not in tensors]
        if missing:
            raise DataFormatError(
                f"the checkpoint lacks {len(missing)} optimizer tensors, e.g. {missing[:3]}; "
                "it is damaged, or was saved with a different precision or model"
            )
        parts = {pair.name: tuple(pair.master_param.shape) for pair in self.pairs}
        for own, param in self.named_params:
            name = names[own]
            for key in ("master", *_MOMENTS):
                tensor = tensors.get(f"{PREFIX}{key}/{name}")
                if tensor is not None and tuple(tensor.shape) not in (tuple(param.shape), parts.get(own)):
                    raise DataFormatError(
                        f"optimizer tensor {PREFIX}{key}/{name} has shape {tuple(tensor.shape)}, "
                        f"the model parameter has {tuple(param.shape)} (this rank's part: {parts.get(own)})"
                    )
            step = tensors.get(f"{PREFIX}step/{name}")
            if step is not None and step.dim() != 0:
                raise DataFormatError(
                    f"optimizer tensor {PREFIX}step/{name} must be a scalar, got shape {tuple(step.shape)}"
                )

    def _check_json(self, state_json: Optional[Mapping[str, Any]]) -> None:
        """Validate saved hyper-parameters against this optimizer; warn when betas/eps changed."""
        if state_json is None:
            return
        if state_json.get("format") != STATE_FORMAT or state_json.get("kind") != "adamw":
            raise DataFormatError(
                f"optimizer state has format {state_json.get('format')!r}, kind "
                f"{state_json.get('kind')!r}; this version reads format {STATE_FORMAT} adamw"
            )
        saved_groups = state_json.get("groups")
        groups = self.inner.param_groups
        if (
            not isinstance(saved_groups, list)
            or len(saved_groups) != len(groups)
            or any(saved.get("num_params", size) != size for saved, size in zip(saved_groups, self._group_sizes))
        ):
            raise DataFormatError(
                "the checkpoint's optimizer param groups do not match this model's "
                f"({self._group_sizes} params per group); saved from another model?"
            )
        for saved, group in zip(saved_groups, groups):
            if list(saved.get("betas", [])) != list(group["betas"]) or saved.get("eps") != group["eps"]:
                logger.warning(
                    "Adam betas/eps changed from %s/%s in the checkpoint to %s/%s; using the new values",
                    saved.get("betas"),
                    saved.get("eps"),
                    list(group["betas"]),
                    group["eps"],
                )
                break
