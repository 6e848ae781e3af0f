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

The list :attr:`MixedPrecisionOptimizer.pairs` of :class:`ParamPair` (model param, master param, name) is
the one seam a sharded (distributed) optimizer replaces. Checkpoint tensors are flat and name-keyed:
``optimizer.master/<name>`` (only when the master is a separate copy), ``optimizer.exp_avg/<name>``,
``optimizer.exp_avg_sq/<name>`` and ``optimizer.step/<name>`` (0-d fp32).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from megalign.errors import ConfigError, DataFormatError
from megalign.training.loss_scale import LossScaler, unscale_and_check

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
PREFIX = "optimizer."
_MOMENTS = ("exp_avg", "exp_avg_sq")
# Megatron flag destinations read by MixedPrecisionOptimizer.from_args, with Megatron's defaults.
_ARG_DEFAULTS: Dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999,
                                 "adam_eps": 1e-8, "clip_grad": 1.0, "log_num_zeros_in_grad": False}


def param_groups_for(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Megatron's grouping: biases and 1-D params (norm weights) get no weight decay, the rest do.

    Returns up to two groups (empty ones left out), each ``{"params", "names", "weight_decay", "lr_mult",
    "wd_mult"}``: the decay group has ``wd_mult=1``, the no-decay group ``wd_mult=0`` (so
    ``LRSchedule.apply`` keeps its decay at 0); both have ``lr_mult=1``. Frozen params are left out; tied
    params appear once.
    """
    decay: Dict[str, Any] = {"params": [], "names": [], "weight_decay": float(weight_decay),
                             "lr_mult": 1.0, "wd_mult": 1.0}
    no_decay: Dict[str, Any] = {"params": [], "names": [], "weight_decay": 0.0, "lr_mult": 1.0, "wd_mult": 0.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = no_decay if (param.dim() == 1 or name.endswith(".bias")) else decay
        group["params"].append(param)
        group["names"].append(name)
    return [group for group in (decay, no_decay) if group["params"]]


@dataclass
class ParamPair:
    """One trainable parameter: the model's tensor, its fp32 master (the same object for fp32), its name."""

    name: str
    model_param: nn.Parameter
    master_param: torch.Tensor

    @property
    def separate_master(self) -> bool:
        """True when the master is an fp32 copy of a bf16/fp16 model parameter."""
        return self.master_param is not self.model_param


@dataclass
class StepResult:
    """Outcome of one :meth:`MixedPrecisionOptimizer.step`.

    ``grad_norm`` is the global L2 norm of the unscaled gradients before clipping (None when skipped);
    ``num_zeros`` counts zero gradient elements when the optimizer was built with ``count_zeros=True``.
    """

    skipped: bool
    grad_norm: Optional[float]
    num_zeros: Optional[int] = None


class MixedPrecisionOptimizer:
    """AdamW over fp32 master weights with fp32 gradient accumulation, loss-scale handling and clipping.

    Use per iteration: ``opt.zero_grad()``; for each micro-batch ``scaler.scale(loss).backward()``; then
    ``result = opt.step(scaler)``. Call :meth:`close` before building another optimizer over the same model.
    """

    def __init__(self, param_groups: Sequence[Mapping[str, Any]], *, lr: float,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip_grad: float = 0.0,
                 count_zeros: bool = False) -> None:
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ConfigError(f"--lr {lr} must be a finite number >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"--adam-beta1/--adam-beta2 {betas} must be in [0, 1)")
        if not eps > 0.0:
            raise ConfigError(f"--adam-eps {eps} must be > 0")
        if not (math.isfinite(clip_grad) and clip_grad >= 0.0):
            raise ConfigError(f"--clip-grad {clip_grad} must be >= 0 (0 disables clipping)")
        self.clip_grad = float(clip_grad)
        self.count_zeros = bool(count_zeros)
        self.pairs: List[ParamPair] = []
        master_groups = []
        self._hooks: List[Any] = []
        try:
            for index, group in enumerate(param_groups):
                params, names = list(group["params"]), group.get("names")
                if names is None or len(names) != len(params):
                    raise ValueError(f"param group {index} needs a 'names' list as long as its 'params' "
                                     "(build groups with param_groups_for)")
                masters = [self._add_pair(name, param) for name, param in zip(names, params)]
                extra = {key: value for key, value in group.items() if key not in ("params", "names")}
                extra.setdefault("lr_mult", 1.0)
                extra.setdefault("wd_mult", 1.0)
                master_groups.append({"params": masters, "names": list(names), **extra})
            if not self.pairs:
                raise ConfigError("the model has no trainable parameters to optimize")
        except BaseException:
            self.close()  # drop the main_grad buffers already attached
            raise
        # the fused kernel (one pass over all tensors) exists for CUDA and CPU; other devices use foreach
        fused = all(pair.master_param.device.type in ("cuda", "cpu") for pair in self.pairs)
        self.inner = torch.optim.AdamW(master_groups, lr=lr, betas=tuple(betas), eps=eps,
                                       fused=True if fused else None, foreach=None if fused else True)
        self._hooks = [pair.model_param.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
                       for pair in self.pairs]

    def _add_pair(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """Create the master and ``main_grad`` for ``param`` and record the pair; return the master."""
        if not param.is_floating_point():
            raise ValueError(f"parameter {name} has dtype {param.dtype}; only floating-point params are trained")
        if any(pair.model_param is param for pair in self.pairs):
            raise ValueError(f"parameter {name} appears twice in the param groups")
        if hasattr(param, "main_grad"):
            raise ValueError(f"parameter {name} is already managed by a MixedPrecisionOptimizer; call that "
                             "optimizer's close() before building a new one over the same model")
        master = param if param.dtype == torch.float32 else param.detach().clone().float()
        param.main_grad = torch.zeros_like(param, dtype=torch.float32)
        self.pairs.append(ParamPair(name, param, master))
        return master

    @classmethod
    def from_args(cls, model: nn.Module, args: Any) -> "MixedPrecisionOptimizer":
        """Build from Megatron flag destinations (lr, weight_decay, adam_beta1/2, adam_eps, clip_grad,
        log_num_zeros_in_grad); missing attributes take Megatron's defaults."""
        value = {key: getattr(args, key, None) for key in _ARG_DEFAULTS}
        value = {key: default if value[key] is None else value[key] for key, default in _ARG_DEFAULTS.items()}
        groups = param_groups_for(model, value["weight_decay"])
        return cls(groups, lr=value["lr"], betas=(value["adam_beta1"], value["adam_beta2"]), eps=value["adam_eps"],
                   clip_grad=value["clip_grad"], count_zeros=value["log_num_zeros_in_grad"])

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The inner AdamW's groups (what ``LRSchedule.apply`` writes lr and weight_decay into)."""
        return self.inner.param_groups

    def main_grads(self) -> List[torch.Tensor]:
        """The fp32 accumulated gradients, in :attr:`pairs` order."""
        return [pair.model_param.main_grad for pair in self.pairs]

    def zero_grad(self) -> None:
        """Zero the fp32 accumulation buffers (start of an iteration) and drop any stray ``.grad``."""
        for pair in self.pairs:
            pair.model_param.main_grad.zero_()
            pair.model_param.grad = None
            pair.master_param.grad = None

    def step(self, loss_scaler: Optional[LossScaler] = None) -> StepResult:
        """Unscale and check, skip on NaN/Inf (scaler updated either way), clip, AdamW step, copy back.

        Without a scaler the gradients are only checked for NaN/Inf.
        """
        grads = self.main_grads()
        for pair in self.pairs:
            pair.master_param.grad = pair.model_param.main_grad
        if loss_scaler is None or loss_scaler.scale_value == 1.0:
            # nothing to unscale: the global norm (needed for clipping anyway) is finite iff every element is
            total_norm = torch.nn.utils.get_total_norm(grads, 2.0)
            found_inf = not bool(torch.isfinite(total_norm))
            if loss_scaler is not None:
                loss_scaler.update(found_inf)
        else:
            found_inf = loss_scaler.unscale_and_check(grads)
            loss_scaler.update(found_inf)
            total_norm = None if found_inf else torch.nn.utils.get_total_norm(grads, 2.0)
        if found_inf:
            for pair in self.pairs:
                pair.master_param.grad = None
            return StepResult(skipped=True, grad_norm=None)
        masters = [pair.master_param for pair in self.pairs]
        if self.clip_grad > 0.0:  # torch's rule: scale by min(1, clip / (norm + 1e-6)); x * 1.0 is exact
            torch.nn.utils.clip_grads_with_norm_(masters, self.clip_grad, total_norm)
        num_zeros = sum(int((grad == 0).sum().item()) for grad in grads) if self.count_zeros else None
        self.inner.step()
        with torch.no_grad():
            for pair in self.pairs:
                pair.master_param.grad = None
                if pair.separate_master:
                    pair.model_param.copy_(pair.master_param)
        return StepResult(skipped=False, grad_norm=float(total_norm.item()), num_zeros=num_zeros)

    def close(self) -> None:
        """Remove the gradient hooks and ``main_grad`` buffers from the model parameters."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for pair in self.pairs:
            if hasattr(pair.model_param, "main_grad"):
                del pair.model_param.main_grad

    # ----- checkpoint state -----

    def _names(self, param_names: Optional[Mapping[str, str]]) -> List[str]:
        """Checkpoint name of every pair: its own name, or ``param_names[name]`` (e.g. global layer numbers)."""
        if param_names is None:
            return [pair.name for pair in self.pairs]
        missing = [pair.name for pair in self.pairs if pair.name not in param_names]
        if missing:
            raise ValueError(f"param_names lacks {len(missing)} parameters, e.g. {missing[:3]}")
        return [param_names[pair.name] for pair in self.pairs]

    def state_dict_tensors(self, param_names: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
        """Flat name-keyed optimizer tensors for ``save_checkpoint(optimizer_state=...)``.

        ``param_names`` maps this optimizer's parameter names to checkpoint names (default: unchanged). The
        tensors are live (not copies): save them before the next :meth:`step`.
        """
        tensors: Dict[str, torch.Tensor] = {}
        for pair, name in zip(self.pairs, self._names(param_names)):
            if pair.separate_master:
                tensors[f"{PREFIX}master/{name}"] = pair.master_param.detach()
            state = self.inner.state.get(pair.master_param, {})
            for key in (*_MOMENTS, "step"):
                if key in state:
                    tensors[f"{PREFIX}{key}/{name}"] = state[key].detach()
        return tensors

    def state_dict_json(self) -> Dict[str, Any]:
        """JSON-able hyper-parameters: per group lr, weight_decay, betas, eps, multipliers and member count."""
        groups = [{"lr": group["lr"], "weight_decay": group["weight_decay"], "betas": list(group["betas"]),
                   "eps": group["eps"], "lr_mult": group["lr_mult"], "wd_mult": group["wd_mult"],
                   "num_params": len(group["params"])} for group in self.inner.param_groups]
        return {"format": STATE_FORMAT, "kind": "adamw", "clip_grad": self.clip_grad, "groups": groups}

    def load_state_dict_tensors(self, tensors: Mapping[str, torch.Tensor],
                                state_json: Optional[Mapping[str, Any]] = None,
                                param_names: Optional[Mapping[str, str]] = None) -> None:
        """Restore :meth:`state_dict_tensors` (and optionally :meth:`state_dict_json`) output exactly.

        Masters are loaded and copied into the model params; moments and step counts replace the AdamW
        state. Group lr and weight_decay come from ``state_json`` (the LR schedule rewrites them anyway);
        betas/eps stay as configured now. Raises DataFormatError naming missing, unexpected or misshapen
        tensors.
        """
        names = self._names(param_names)
        ours = {f"{PREFIX}{key}/{name}" for name in names for key in (*_MOMENTS, "step", "master")}
        unexpected = sorted(key for key in tensors if key.startswith(PREFIX) and key not in ours)
        if unexpected:
            raise DataFormatError(f"the checkpoint has {len(unexpected)} optimizer tensors for parameters this "
                                  f"model lacks, e.g. {unexpected[:3]}; was it saved from a different model?")
        with_state = [f"{PREFIX}exp_avg/{name}" in tensors for name in names]
        required = [f"{PREFIX}master/{name}" for pair, name in zip(self.pairs, names) if pair.separate_master]
        if any(with_state):
            required += [f"{PREFIX}{key}/{name}" for name in names for key in (*_MOMENTS, "step")]
        missing = [key for key in required if key not in tensors]
        if missing:
            raise DataFormatError(f"the checkpoint lacks {len(missing)} optimizer tensors, e.g. {missing[:3]}; "
                                  "it is damaged, or was saved with a different precision or model")
        for pair, name in zip(self.pairs, names):
            for key in ("master", *_MOMENTS):
                tensor = tensors.get(f"{PREFIX}{key}/{name}")
                if tensor is not None and tuple(tensor.shape) != tuple(pair.model_param.shape):
                    raise DataFormatError(f"optimizer tensor {PREFIX}{key}/{name} has shape {tuple(tensor.shape)}, "
                                          f"the model parameter has {tuple(pair.model_param.shape)}")
            step = tensors.get(f"{PREFIX}step/{name}")
            if step is not None and step.dim() != 0:
                raise DataFormatError(f"optimizer tensor {PREFIX}step/{name} must be a scalar, "
                                      f"got shape {tuple(step.shape)}")
        self._check_json(state_json)

        torch_state: Dict[str, Any] = {"state": {}, "param_groups": []}
        index = {id(pair.master_param): i for i, pair in enumerate(self.pairs)}
        names_by_id = {id(pair.master_param): name for pair, name in zip(self.pairs, names)}
        for number, group in enumerate(self.inner.param_groups):
            saved = state_json["groups"][number] if state_json is not None else {}
            torch_state["param_groups"].append(
                {**{key: value for key, value in group.items() if key != "params"},
                 "lr": saved.get("lr", group["lr"]), "weight_decay": saved.get("weight_decay", group["weight_decay"]),
                 "params": [index[id(master)] for master in group["params"]]})
            for master in group["params"]:
                name = names_by_id[id(master)]
                if f"{PREFIX}exp_avg/{name}" in tensors:
                    torch_state["state"][index[id(master)]] = {
                        key: tensors[f"{PREFIX}{key}/{name}"].detach().clone() for key in (*_MOMENTS, "step")}
        self.inner.load_state_dict(torch_state)
        with torch.no_grad():
            for pair, name in zip(self.pairs, names):
                if pair.separate_master:
                    pair.master_param.copy_(tensors[f"{PREFIX}master/{name}"])
                    pair.model_param.copy_(pair.master_param)

    def _check_json(self, state_json: Optional[Mapping[str, Any]]) -> None:
        """Validate saved hyper-parameters against this optimizer; warn when betas/eps changed."""
        if state_json is None:
            return
        if state_json.get("format") != STATE_FORMAT or state_json.get("kind") != "adamw":
            raise DataFormatError(f"optimizer state has format {state_json.get('format')!r}, kind "
                                  f"{state_json.get('kind')!r}; this version reads format {STATE_FORMAT} adamw")
        saved_groups = state_json.get("groups")
        groups = self.inner.param_groups
        if not isinstance(saved_groups, list) or len(saved_groups) != len(groups) or any(
                saved.get("num_params") != len(group["params"]) for saved, group in zip(saved_groups, groups)):
            raise DataFormatError("the checkpoint's optimizer param groups do not match this model's "
                                  f"({[len(g['params']) for g in groups]} params per group); saved from another model?")
        for saved, group in zip(saved_groups, groups):
            if list(saved.get("betas", [])) != list(group["betas"]) or saved.get("eps") != group["eps"]:
                logger.warning("Adam betas/eps changed from %s/%s in the checkpoint to %s/%s; using the new values",
                               saved.get("betas"), saved.get("eps"), list(group["betas"]), group["eps"])
                break


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: add this backward's ``.grad`` into the fp32 ``main_grad`` and free it."""
    if param.grad is not None:
        param.main_grad.add_(param.grad)
        param.grad = None

