#!/usr/bin/env python3
"""Benchmark: training-step tokens/s and peak memory, megalign GPTModel vs transformers LlamaForCausalLM, same run.

Both sides get the same model shape (HF's config from ``megalign.model.to_hf_config``, SDPA attention),
the same weights (megalign's initialisation copied into HF's model through ``megalign_state_dict_to_hf``),
the same random token batch (fixed seed), the same optimizer hyper-parameters and the same
``torch.set_num_threads``. Before anything is timed, both fp32 models compute the loss of the batch and
the two losses must agree to rtol 1e-4: the comparison is between two implementations of one function.

One training step is what each side's training loop does per global batch of one micro-batch:

* megalign (as ``megalign.training.trainer.Trainer.train_step``): ``MixedPrecisionOptimizer.zero_grad``,
  ``GPTModel(tokens, labels=labels)`` (labels already shifted), ``ConstantLossScaler(1).scale(loss).backward()``
  (gradients flow into fp32 ``main_grad`` buffers), ``MixedPrecisionOptimizer.step`` (NaN/Inf check,
  global-norm clipping, fused AdamW over fp32 masters, copy back for bf16), ``loss.item()``.
* Hugging Face (a plain PyTorch loop, as transformers' Trainer runs it): ``zero_grad(set_to_none=True)``,
  ``LlamaForCausalLM(input_ids, labels=..., shift_labels=labels)`` (``shift_labels`` makes HF score every
  position against the same next tokens, since HF otherwise shifts ``labels`` itself and drops the last
  position), ``loss.backward()``, ``clip_grad_norm_`` (when ``--clip-grad`` > 0, like the Trainer's
  ``max_grad_norm``), ``torch.optim.AdamW`` (torch's default implementation unless ``--hf-optimizer``),
  ``loss.item()``. Both optimizers use Megatron's grouping (no weight decay on 1-D params).

Precision: ``--dtype fp32`` trains both in fp32. ``--dtype bf16``: megalign's model is bf16 with fp32
master weights (``--bf16`` in the trainer); HF's model stays fp32 under ``torch.autocast(bfloat16)``
(what transformers' Trainer does with ``--bf16``): both keep fp32 weights for the update.

Timing: ``--warmup`` untimed steps, then ``--steps`` timed steps per side, interleaved (megalign, HF,
HF, megalign, ...) so machine noise hits both; the figure is tokens per step / median step time
(``torch.cuda.synchronize`` before each clock read on CUDA; ``loss.item()`` syncs anyway).

Peak memory: each side runs alone in a fresh subprocess (this script with ``--memory-child SIDE``) that
builds the batch, records a baseline, builds that side's model and optimizer and runs
``--memory-steps`` training steps (optimizer state is allocated in the first). On CPU the figure is the
growth of the process's peak resident set size over its resident size just before the model was built:
the kernel's high-water mark is reset there (``echo 5 > /proc/self/clear_refs``, so the import-time peak
does not hide a smaller one) and the figure is ``VmHWM`` after the steps minus ``VmRSS`` at the reset
(``/proc/self/status``): weights, gradients, optimizer state, activations and allocator slack, as the OS
sees them. On CUDA it is ``torch.cuda.max_memory_allocated()`` of the child, whose only tensors are that
side's. Both children import the same modules, so import overhead is outside the difference.

On a CPU shared with other jobs, ``--threads`` equal to the core count oversubscribes the cores and step
times swing by 3x; ``--threads 1`` gives stable figures there (the report prints median and best).

``--profile N`` runs one more step per side under ``torch.profiler`` and prints the N ops with the most
self CPU time (self CUDA time too on CUDA).

    python benchmarks/train_throughput.py                       # hidden 512, 8 layers, seq 512, micro batch 4
    python benchmarks/train_throughput.py --quick               # a small shape, for a smoke run
    python benchmarks/train_throughput.py --dtype bf16 --compile --profile 12
    python benchmarks/train_throughput.py --preset small --seq-length 1024 --json out.json
"""
from __future__ import annotations

import argparse
import json
import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megalign.model import (PRESETS, GPTModel, ModelConfig, megalign_state_dict_to_hf, preset,  # noqa: E402
                            to_hf_config)
from megalign.config.sections import OptimizationSection, ParallelSection  # noqa: E402
from megalign.training.loss_scale import ConstantLossScaler  # noqa: E402
from megalign.training.optimizer import MixedPrecisionOptimizer, param_groups_for  # noqa: E402
from megalign.utils.atomic import write_json_atomic  # noqa: E402

TARGET = "target: 1.5x (parity is the floor)"
SIDES = ("megalign", "hf")
LABELS = {"megalign": "megalign GPTModel + MixedPrecisionOptimizer", "hf": "transformers LlamaForCausalLM + AdamW"}
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
# Shape fields, with the default and --quick values (a --preset replaces both; explicit flags override all).
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size")
DEFAULT_SHAPE = {"hidden_size": 512, "num_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "intermediate_size": 1536, "vocab_size": 32000, "seq_length": 512, "micro_batch_size": 4}
QUICK_SHAPE = {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 384, "vocab_size": 4096, "seq_length": 128, "micro_batch_size": 2}


# ---- configuration ---------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; the result also keeps ``argv`` (the memory children re-run it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small shape and fewer steps (smoke run)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="start from a megalign model preset")
    for name in SHAPE_FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {DEFAULT_SHAPE[name]} ({QUICK_SHAPE[name]} with --quick)")
    parser.add_argument("--seq-length", type=int, default=None, help="default 512 (128 with --quick)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default 4 (2 with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads for both sides (default: all usable cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 5, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 2, 1 with --quick)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps run by each memory child")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--hf-optimizer", choices=["default", "foreach", "fused"], default="default",
                        help="torch.optim.AdamW implementation for the HF side (default: torch's choice)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--adam-beta1", type=float, default=0.9)
    parser.add_argument("--adam-beta2", type=float, default=0.95)
    parser.add_argument("--adam-eps", type=float, default=1e-8)
    parser.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clipping on both sides (0: off)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more step per side and print its top N ops by self CPU time")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--memory-child", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    for name in ("steps", "warmup", "memory_steps", "threads"):
        if getattr(args, name) < (1 if name != "warmup" else 0):
            parser.error(f"--{name.replace('_', '-')} must be >= {1 if name != 'warmup' else 0}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def model_config(args: argparse.Namespace) -> Tuple[ModelConfig, int, int]:
    """(model config, seq length, micro batch size) from --preset / --quick / the shape flags."""
    base = dict(QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    overrides: Dict[str, Any] = {}
    if args.preset is None:
        overrides = {name: base[name] for name in SHAPE_FIELDS}
    overrides.update({name: getattr(args, name) for name in SHAPE_FIELDS if getattr(args, name) is not None})
    seq = args.seq_length or base["seq_length"]
    micro = args.micro_batch_size or base["micro_batch_size"]
    if args.preset is not None:
        config = preset(args.preset, **overrides)
    else:
        config = ModelConfig(max_position_embeddings=max(seq, 1024), **overrides)
    return config, seq, micro


def make_batch(config: ModelConfig, seq_length: int, micro_batch_size: int, seed: int,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) ``[micro_batch, seq]``: random ids from a fixed seed, labels = tokens shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (micro_batch_size, seq_length + 1), generator=generator)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


# ---- models ----------------------------------------------------------------------------------------------
def build_megalign(config: ModelConfig, device: torch.device, seed: int) -> GPTModel:
    """megalign's model in fp32 with its own (seeded) initialisation."""
    torch.manual_seed(seed)
    return GPTModel(config).to(device)


def build_hf(config: ModelConfig, device: torch.device) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (Qwen2ForCausalLM for q/k/v biases) of ``config``'s shape, fp32, SDPA."""
    import transformers

    hf = to_hf_config(config)
    if config.architecture == "Qwen2ForCausalLM":
        config_cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    else:
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    return model_cls(config_cls(**hf, attn_implementation="sdpa")).to(device)


def copy_weights_to_hf(ours: GPTModel, hf: torch.nn.Module) -> None:
    """Copy megalign's weights into the HF model (copies, not shared storage: the two train independently)."""
    state = megalign_state_dict_to_hf(ours.state_dict(), ours.config)
    result = hf.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if ours.config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise RuntimeError(f"HF model does not take megalign's weights: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def build_pair(config: ModelConfig, device: torch.device, seed: int) -> Tuple[GPTModel, torch.nn.Module]:
    """Both fp32 models, holding the same weights."""
    ours = build_megalign(config, device, seed)
    hf = build_hf(config, device)
    copy_weights_to_hf(ours, hf)
    return ours, hf


def hf_loss(model: Callable[..., Any], tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's own causal-LM loss over every position against ``labels`` (already the next tokens)."""
    return model(input_ids=tokens, labels=tokens, shift_labels=labels).loss


def check_same_function(ours: GPTModel, hf: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                        rtol: float = LOSS_RTOL["fp32"]) -> Tuple[float, float]:
    """Both models' loss on the batch (no grad); raise if they differ by more than ``rtol``."""
    with torch.no_grad():
        mine, theirs = float(ours(tokens, labels=labels)), float(hf_loss(hf, tokens, labels))
    if abs(mine - theirs) > rtol * abs(theirs):
        raise RuntimeError(f"the two models disagree before training: megalign loss {mine:.6f}, HF loss "
                           f"{theirs:.6f} (rtol {rtol}); the comparison would be meaningless")
    return mine, theirs


# ---- one training step per side ---------------------------------------------------------------------------
@dataclass
class Side:
    """One side of the comparison: a name, its (possibly compiled) model and a callable running one step."""

    name: str
    model: torch.nn.Module
    step: Callable[[], float]


def _optimization(args: argparse.Namespace) -> OptimizationSection:
    return OptimizationSection(lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                               adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad)


def megalign_side(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> Side:
    """The trainer's step: bf16 model + fp32 masters for --dtype bf16; optimizer built by ``from_config``."""
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    optimizer = MixedPrecisionOptimizer.from_config(model, _optimization(args), ParallelSection())
    scaler = ConstantLossScaler(1.0)
    forward = torch.compile(model) if args.compile else model

    def step() -> float:
        model.train()
        optimizer.zero_grad()
        loss = forward(tokens, labels=labels).float()
        scaler.scale(loss).backward()
        result = optimizer.step(scaler)
        if result.skipped:
            raise RuntimeError("megalign skipped a step (NaN/Inf gradients)")
        return float(loss.item())

    return Side("megalign", model, step)


def hf_side(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> Side:
    """A plain HF training step: AdamW over the same groups and hyper-parameters, autocast for bf16."""
    groups = [{"params": group["params"], "weight_decay": group["weight_decay"]}
              for group in param_groups_for(model, args.weight_decay)]
    choice = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[args.hf_optimizer]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                  **choice)
    params = [p for group in groups for p in group["params"]]
    forward = torch.compile(model) if args.compile else model
    device_type = tokens.device.type

    def step() -> float:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = hf_loss(forward, tokens, labels)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        optimizer.step()
        return float(loss.item())

    return Side("hf", model, step)


def make_sides(args: argparse.Namespace, device: torch.device) -> Tuple[List[Side], Dict[str, Any]]:
    """Build both sides on the same weights and batch after checking they compute the same loss."""
    config, seq, micro = model_config(args)
    tokens, labels = make_batch(config, seq, micro, args.seed, device)
    ours, hf = build_pair(config, device, args.seed)
    initial = check_same_function(ours, hf, tokens, labels)
    info = {"config": config.to_dict(), "seq_length": seq, "micro_batch_size": micro,
            "tokens_per_step": seq * micro, "parameters": sum(p.numel() for p in ours.parameters()),
            "initial_loss": {"megalign": initial[0], "hf": initial[1]}}
    return [megalign_side(ours, tokens, labels, args), hf_side(hf, tokens, labels, args)], info


# ---- measurement ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(sides: Sequence[Side], warmup: int, steps: int,
               device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Run ``warmup`` then ``steps`` steps per side, alternating the order each round.

    Returns (seconds of each timed step, loss of every step incl. warm-up) per side name.
    """
    seconds: Dict[str, List[float]] = {side.name: [] for side in sides}
    losses: Dict[str, List[float]] = {side.name: [] for side in sides}
    for round_number in range(warmup + steps):
        order = sides if round_number % 2 == 0 else list(reversed(sides))
        for side in order:
            _sync(device)
            start = time.perf_counter()
            losses[side.name].append(side.step())
            _sync(device)
            if round_number >= warmup:
                seconds[side.name].append(time.perf_counter() - start)
    return seconds, losses


def check_first_losses(losses: Dict[str, List[float]], dtype: str) -> None:
    """The first training step sees identical weights: its losses must agree (looser in bf16)."""
    mine, theirs = losses["megalign"][0], losses["hf"][0]
    if abs(mine - theirs) > LOSS_RTOL[dtype] * abs(theirs):
        raise RuntimeError(f"first-step losses differ: megalign {mine:.6f}, HF {theirs:.6f} "
                           f"(rtol {LOSS_RTOL[dtype]} for {dtype})")


def _proc_status_kib(key: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} field")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return that RSS in KiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    return _proc_status_kib("VmRSS")


def memory_child(args: argparse.Namespace) -> Dict[str, Any]:
    """In a fresh process: peak memory of ``args.memory_child``'s side alone (see the module docstring)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    config, seq, micro = model_config(args)
    tokens, labels = make_batch(config, seq, micro, args.seed, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    before_kib = _reset_peak_rss()
    if args.memory_child == "megalign":
        side = megalign_side(build_megalign(config, device, args.seed), tokens, labels, args)
    else:
        side = hf_side(build_hf(config, device), tokens, labels, args)
    for _ in range(args.memory_steps):
        side.step()
    _sync(device)
    after_kib = _proc_status_kib("VmHWM")
    if device.type == "cuda":
        return {"side": args.memory_child, "kind": "cuda max_memory_allocated",
                "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"side": args.memory_child, "kind": "peak RSS growth", "bytes": (after_kib - before_kib) * 1024}


def peak_memory(args: argparse.Namespace, side: str) -> Dict[str, Any]:
    """Run :func:`memory_child` for ``side`` in a subprocess of this script; its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), *args.argv, "--memory-child", side]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {side} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile_step(side: Side, device: torch.device, top: int) -> List[Dict[str, Any]]:
    """One step of ``side`` under torch.profiler: the ``top`` ops by self CPU time (microseconds)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        side.step()
        _sync(device)
    events = list(prof.key_averages())
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    rows = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    return [{"op": event.key, "calls": event.count, "self_cpu_us": event.self_cpu_time_total,
             "self_cpu_share": event.self_cpu_time_total / total,
             "self_device_us": getattr(event, "self_device_time_total", 0.0)} for event in rows]


# ---- the run -----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Measure both sides; returns the results dict the report prints (and ``--json`` writes)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sides, info = make_sides(args, device)
    log(f"[bench] {info['parameters'] / 1e6:.1f}M parameters, {info['config']['num_layers']} layers, hidden "
        f"{info['config']['hidden_size']}, seq {info['seq_length']} x micro batch {info['micro_batch_size']}, "
        f"{args.dtype}, {args.device}, {args.threads} threads{', compiled' if args.compile else ''}; "
        f"initial loss megalign {info['initial_loss']['megalign']:.6f} = HF {info['initial_loss']['hf']:.6f}")
    seconds, losses = time_steps(sides, args.warmup, args.steps, device)
    check_first_losses(losses, args.dtype)
    results: Dict[str, Any] = {**info, "device": args.device, "dtype": args.dtype, "threads": args.threads,
                               "compile": args.compile, "hf_optimizer": args.hf_optimizer, "sides": {}}
    for name in SIDES:
        median = statistics.median(seconds[name])
        results["sides"][name] = {"step_seconds": seconds[name], "median_step_seconds": median,
                                  "tokens_per_second": info["tokens_per_step"] / median,
                                  "best_tokens_per_second": info["tokens_per_step"] / min(seconds[name]),
                                  "first_loss": losses[name][0], "last_loss": losses[name][-1]}
    mine, theirs = results["sides"]["megalign"], results["sides"]["hf"]
    results["ratio"] = mine["tokens_per_second"] / theirs["tokens_per_second"]
    results["ratio_best"] = mine["best_tokens_per_second"] / theirs["best_tokens_per_second"]
    if not args.no_memory:
        for name in SIDES:
            log(f"[bench] peak memory of {name} alone (fresh subprocess, {args.memory_steps} steps) ...")
            results["sides"][name]["peak_memory"] = peak_memory(args, name)
    if args.profile:
        for side in sides:
            results["sides"][side.name]["profile"] = profile_step(side, device, args.profile)
    return results


def format_report(results: Dict[str, Any]) -> List[str]:
    """The printed figures: both rates, the ratio, the target, peak memory and the profiles."""
    lines = []
    sides = results["sides"]
    for name in SIDES:
        side = sides[name]
        spread = f"{min(side['step_seconds']):.3f}-{max(side['step_seconds']):.3f}"
        memory = side.get("peak_memory")
        mem_text = f", peak memory {memory['bytes'] / 2 ** 20:,.0f} MiB" if memory else ""
        lines.append(f"{LABELS[name]:<45}: {side['tokens_per_second']:>10,.0f} tokens/s  (median step "
                     f"{side['median_step_seconds']:.3f} s, range {spread}; best {side['best_tokens_per_second']:,.0f} "
                     f"tokens/s){mem_text}")
    lines.append(f"losses: first megalign {sides['megalign']['first_loss']:.6f} / HF {sides['hf']['first_loss']:.6f}, "
                 f"last megalign {sides['megalign']['last_loss']:.6f} / HF {sides['hf']['last_loss']:.6f}")
    if all("peak_memory" in sides[name] for name in SIDES):
        mine, theirs = sides["megalign"]["peak_memory"]["bytes"], sides["hf"]["peak_memory"]["bytes"]
        lines.append(f"peak memory ({sides['hf']['peak_memory']['kind']}): megalign/HF {mine / max(theirs, 1):.2f}")
    lines.append(f"speedup (megalign/HF tokens/s, median steps): {results['ratio']:.2f}x  ({TARGET}); "
                 f"best steps: {results['ratio_best']:.2f}x")
    for name in SIDES:
        rows = sides[name].get("profile")
        if not rows:
            continue
        lines.append(f"profile, {LABELS[name]} (one step, top {len(rows)} ops by self CPU time):")
        for row in rows:
            device_text = f"  device {row['self_device_us'] / 1e3:9.1f} ms" if row["self_device_us"] else ""
            lines.append(f"  {row['op'][:60]:<60} {row['calls']:>5} calls  {row['self_cpu_us'] / 1e3:9.1f} ms "
                         f"{100 * row['self_cpu_share']:5.1f}%{device_text}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return 0
    results = run(args)
    for line in format_report(results):
        print(line)
    if args.json:
        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
