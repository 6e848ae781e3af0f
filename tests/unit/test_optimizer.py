"""MixedPrecisionOptimizer: AdamW parity, param groups, fp32 accumulation, clipping, bf16/fp16, exact resume."""
from __future__ import annotations

import copy
from typing import Callable, List, Tuple

import pytest
import torch
from torch import nn

from megalign.errors import DataFormatError
from megalign.model import GPTModel, preset
from megalign.checkpoint.storage import load_checkpoint, save_checkpoint
from megalign.training.loss_scale import ConstantLossScaler, DynamicLossScaler
from megalign.training.lr_schedule import LRSchedule
from megalign.training.optimizer import MixedPrecisionOptimizer, param_groups_for

Batch = Tuple[torch.Tensor, torch.Tensor]


def _tiny_gpt(seed: int = 0, **overrides: object) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(preset("tiny", **overrides))


def _token_batches(count: int, batch: int = 2, seq: int = 16, seed: int = 1) -> List[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, 256, (batch, seq + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def _regression(seed: int = 0, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Callable[[int], torch.Tensor]]:
    """A small MLP and a loss function ``loss(step)`` on a fixed random linear target."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    inputs = torch.randn(64, 8, generator=gen)
    targets = inputs @ torch.randn(8, 1, generator=gen)

    def loss(step: int) -> torch.Tensor:
        rows = slice((step % 4) * 16, (step % 4) * 16 + 16)
        pred = model(inputs[rows].to(dtype)).float()
        return ((pred - targets[rows]) ** 2).mean()
    return model, loss


def _params(model: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_fp32_steps_match_torch_adamw_bitwise() -> None:
    model = _tiny_gpt()
    reference = copy.deepcopy(model)
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    ref_groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in param_groups_for(reference, 0.1)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    assert all(pair.master_param is pair.model_param for pair in opt.pairs)  # fp32: no copy
    for tokens, labels in _token_batches(4):
        opt.zero_grad()
        model(tokens, labels=labels).backward()
        result = opt.step(ConstantLossScaler())
        ref_opt.zero_grad()
        reference(tokens, labels=labels).backward()
        ref_opt.step()
        assert not result.skipped and result.grad_norm is not None and result.grad_norm > 0
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(mine, theirs), name


def test_param_groups_biases_and_norms_get_no_decay() -> None:
    model = _tiny_gpt(qkv_bias=True, tie_word_embeddings=True)
    decay, no_decay = param_groups_for(model, 0.05)
    assert (decay["weight_decay"], decay["wd_mult"], decay["lr_mult"]) == (0.05, 1.0, 1.0)
    assert (no_decay["weight_decay"], no_decay["wd_mult"], no_decay["lr_mult"]) == (0.0, 0.0, 1.0)
    assert all(name.endswith(".bias") or "norm" in name for name in no_decay["names"])
    assert "layers.0.attention.q_proj.bias" in no_decay["names"] and "final_norm.weight" in no_decay["names"]
    assert "embed_tokens.weight" in decay["names"] and "layers.1.mlp.down_proj.weight" in decay["names"]
    assert all(p.dim() == 2 for p in decay["params"])
    assert sorted(decay["names"] + no_decay["names"]) == sorted(n for n, _ in model.named_parameters())
    opt = MixedPrecisionOptimizer([decay, no_decay], lr=1e-3)
    LRSchedule(1e-3, train_iters=10, weight_decay=0.05).apply(opt)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_grad_accumulation_matches_one_big_batch() -> None:
    model = _tiny_gpt()
    big = copy.deepcopy(model)
    tokens, labels = _token_batches(1, batch=8)[0]
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.1), lr=1e-3)
    opt_big = MixedPrecisionOptimizer(param_groups_for(big, 0.1), lr=1e-3)
    opt.zero_grad()
    for micro in range(4):
        rows = slice(2 * micro, 2 * micro + 2)
        (model(tokens[rows], labels=labels[rows]) / 4).backward()
        assert all(p.grad is None for p in model.parameters())  # moved into main_grad by the hook
    opt_big.zero_grad()
    big(tokens, labels=labels).backward()
    for mine, theirs in zip(opt.main_grads(), opt_big.main_grads()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    result, result_big = opt.step(), opt_big.step()
    assert result.grad_norm == pytest.approx(result_big.grad_norm, rel=1e-5)
    for mine, theirs in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=2e-5)  # Adam ~ sign(g) near g = 0


def test_clipping_matches_clip_grad_norm() -> None:
    model, loss_fn = _regression()
    reference, ref_loss_fn = _regression()  # same seed: identical weights and data
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.0), lr=1e-2, clip_grad=0.05, count_zeros=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    opt.zero_grad()
    loss_fn(0).backward()
    result = opt.step()
    ref_loss_fn(0).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    assert result.grad_norm == float(ref_norm) and result.grad_norm > 0.05  # clipping is active
    assert result.num_zeros == 0
    ref_params = dict(reference.named_parameters())
    for pair in opt.pairs:  # pairs are in group order (decay group first)
        assert torch.equal(pair.model_param.main_grad, ref_params[pair.name].grad), pair.name
    ref_opt.step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)


def test_bf16_masters_stay_fp32_and_loss_decreases() -> None:
    model, loss_fn = _regression(dtype=torch.bfloat16)
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.0), lr=1e-2, clip_grad=1.0)
    losses = []
    for step in range(50):
        opt.zero_grad()
        loss = loss_fn(step)
        loss.backward()
        assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
        assert not opt.step().skipped
        losses.append(loss.item())
    for pair in opt.pairs:
        assert pair.separate_master and pair.master_param.dtype == torch.float32
        assert pair.model_param.dtype == torch.bfloat16
        assert torch.equal(pair.model_param, pair.master_param.to(torch.bfloat16))
    assert sum(losses[-4:]) < 0.2 * sum(losses[:4])


def test_fp16_inf_gradient_skips_step_and_backs_off() -> None:
    model, loss_fn = _regression(dtype=torch.float16)
    scaler = DynamicLossScaler(initial_scale=1024.0, hysteresis=1)
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.01), lr=1e-2, clip_grad=1.0)
    opt.zero_grad()
    scaler.scale(loss_fn(0)).backward()
    assert not opt.step(scaler).skipped
    before, masters = _params(model), [pair.master_param.clone() for pair in opt.pairs]

    opt.zero_grad()
    scaler.scale(loss_fn(1)).backward()
    model[0].weight.main_grad[0, 0] = float("inf")
    result = opt.step(scaler)
    assert result.skipped and result.grad_norm is None
    assert scaler.scale_value == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, pair.master_param) for a, pair in zip(masters, opt.pairs))

    opt.zero_grad()
    scaler.scale(loss_fn(1)).backward()
    result = opt.step(scaler)
    assert not result.skipped and result.grad_norm is not None
    assert not torch.equal(before[0], model[0].weight)
    assert all(pair.master_param.dtype == torch.float32 for pair in opt.pairs)


def _train_gpt(model: GPTModel, opt: MixedPrecisionOptimizer, sched: LRSchedule, batches: List[Batch]) -> None:
    for tokens, labels in batches:
        opt.zero_grad()
        for micro in range(2):
            rows = slice(micro, micro + 1)
            (model(tokens[rows], labels=labels[rows]) / 2).backward()
        assert not opt.step(ConstantLossScaler()).skipped
        sched.step(opt)


def _setup(dtype: torch.dtype, seed: int = 0) -> Tuple[GPTModel, MixedPrecisionOptimizer, LRSchedule]:
    model = _tiny_gpt(seed, qkv_bias=True).to(dtype)
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.1), lr=1e-2, betas=(0.9, 0.95), clip_grad=1.0)
    sched = LRSchedule(1e-2, min_lr=1e-3, lr_warmup_iters=2, train_iters=6, lr_decay_style="cosine",
                       weight_decay=0.1)
    sched.apply(opt)
    return model, opt, sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_checkpoint_is_bitwise_identical(dtype: torch.dtype, tmp_path) -> None:
    batches = _token_batches(6, batch=2, seq=8)
    straight, straight_opt, straight_sched = _setup(dtype)
    _train_gpt(straight, straight_opt, straight_sched, batches)

    first, first_opt, first_sched = _setup(dtype)
    _train_gpt(first, first_opt, first_sched, batches[:3])
    save_checkpoint(tmp_path, 3, first.state_dict(), first_opt.state_dict_tensors(), rng=False,
                    extra={"optimizer": first_opt.state_dict_json(), "scheduler": first_sched.state_dict()})
    names = set(first_opt.state_dict_tensors())
    assert ("optimizer.master/embed_tokens.weight" in names) == (dtype != torch.float32)
    assert "optimizer.step/final_norm.weight" in names and "optimizer.exp_avg_sq/embed_tokens.weight" in names

    resumed, resumed_opt, resumed_sched = _setup(dtype, seed=7)  # different init: everything must come from disk
    with load_checkpoint(tmp_path) as ckpt:
        resumed.load_state_dict(ckpt.model_state())
        resumed_opt.load_state_dict_tensors(ckpt.optimizer_state(), ckpt.extra["optimizer"])
        resumed_sched.load_state_dict(ckpt.extra["scheduler"])
    resumed_sched.apply(resumed_opt)
    _train_gpt(resumed, resumed_opt, resumed_sched, batches[3:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(straight_opt.pairs, resumed_opt.pairs):
        assert torch.equal(a.master_param, b.master_param), a.name
        state_a, state_b = straight_opt.inner.state[a.master_param], resumed_opt.inner.state[b.master_param]
        assert all(torch.equal(state_a[k], state_b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_load_rejects_missing_or_foreign_tensors() -> None:
    model, opt, sched = _setup(torch.bfloat16)
    _train_gpt(model, opt, sched, _token_batches(1, batch=2, seq=8))
    tensors = {k: v.clone() for k, v in opt.state_dict_tensors().items()}
    fresh, fresh_opt, _ = _setup(torch.bfloat16)
    with pytest.raises(DataFormatError, match="lacks 1 optimizer tensors"):
        fresh_opt.load_state_dict_tensors({k: v for k, v in tensors.items() if k != "optimizer.step/final_norm.weight"})
    with pytest.raises(DataFormatError, match="different model"):
        fresh_opt.load_state_dict_tensors({**tensors, "optimizer.exp_avg/extra.weight": torch.zeros(2)})
    bad = dict(tensors, **{"optimizer.master/final_norm.weight": torch.zeros(3)})
    with pytest.raises(DataFormatError, match="shape"):
        fresh_opt.load_state_dict_tensors(bad)
    renamed = fresh_opt.state_dict_tensors({p.name: "decoder." + p.name for p in fresh_opt.pairs})
    assert all("/decoder." in name for name in renamed)


def test_second_optimizer_needs_close_of_the_first() -> None:
    model = _tiny_gpt()
    opt = MixedPrecisionOptimizer(param_groups_for(model, 0.0), lr=1e-3)
    with pytest.raises(ValueError, match="close"):
        MixedPrecisionOptimizer(param_groups_for(model, 0.0), lr=1e-3)
    assert all(hasattr(p, "main_grad") for p in model.parameters())  # the failed build left opt's buffers alone
    opt.close()
    groups = param_groups_for(model, 0.0)
    with pytest.raises(ValueError, match="twice"):
        MixedPrecisionOptimizer(groups + groups, lr=1e-3)
    assert not any(hasattr(p, "main_grad") for p in model.parameters())  # cleaned up after the failure
    assert not any(hasattr(p, "main_grad") for p in model.parameters())
    MixedPrecisionOptimizer(param_groups_for(model, 0.0), lr=1e-3)


def test_from_config_reads_megatron_flags_and_validates() -> None:
    from megalign.config.sections import OptimizationSection, ParallelSection
    from megalign.errors import ConfigError
    model, _ = _regression()
    section = OptimizationSection(lr=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-6)
    opt = MixedPrecisionOptimizer.from_config(model, section, ParallelSection())
    assert opt.clip_grad == 1.0 and not opt.count_zeros  # the section's default is Megatron's
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [
        (3e-4, 0.1, (0.9, 0.95), 1e-6), (3e-4, 0.0, (0.9, 0.95), 1e-6)]
    opt.close()
    with pytest.raises(ConfigError, match="--clip-grad"):
        MixedPrecisionOptimizer(param_groups_for(model, 0.0), lr=1e-3, clip_grad=-1.0)
