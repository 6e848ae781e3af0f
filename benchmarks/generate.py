#!/usr/bin/env python3
"""Benchmark: generated tokens/s of megalign's in-process generation vs transformers' ``generate()``, same run.

Both sides run the same model: a random Hugging Face ``LlamaForCausalLM`` built from a megalign preset
(``to_hf_config``), saved, imported with ``convert_hf_to_megalign`` and loaded with
``megalign.inference.model_loading.load_model``; megalign's tokenizer is a NullTokenizer covering the model's vocabulary
(prompts are token ids). The prompts are random token ids of random lengths in ``[prompt_length / 2,
prompt_length]``, taken ``--batch-size`` at a time in the same batches on both sides, left-padded:

* megalign: ``Generator.generate(prompts, GenerationParams(max_new_tokens=N, stop_token_ids=()))`` (greedy,
  preallocated KV cache, prefill keeping only the last logits, one token per row per step), on the
  ``FastDecoder`` (fused, transposed weight copies made once per model; ``--reference``: the model's own
  cached forward instead, ``Generator(..., fast=False)``);
* transformers: ``model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=N,
  eos_token_id=None)`` with its default (dynamic) KV cache and SDPA attention.

Neither side stops early (no EOS), so both generate exactly ``prompts x N`` tokens; the figure is those
tokens / wall time of the whole request (prefill included). ``--repeats`` timed runs per side after one
untimed warm-up each, interleaved (megalign, HF, HF, megalign, ...); the report gives the median and best,
and the ratio of process CPU seconds (on a CPU shared with other jobs, run with ``--threads 1`` and read
that figure: wall time then swings by 3x, CPU time does not).
The generated ids of both sides are compared: fp32 greedy decoding of one model should agree exactly
(a near-tie of two logits can flip one token and the rest of that row).

    python benchmarks/generate.py             # preset small, 32 prompts of <= 64 tokens, 128 new tokens
    python benchmarks/generate.py --quick     # preset tiny, a smoke run (< 20 s)
    python benchmarks/generate.py --batch-size 16 --max-new-tokens 256 --threads 1 --json out.json
    python benchmarks/generate.py --threads 1 --reference   # megalign's unfused reference decoding path
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

TARGET = "target: >= 2x transformers generate()"


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="megalign model preset (default small, ~7M parameters)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=64, help="longest prompt (shortest: half)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--reference", action="store_true",
                        help="decode with the model's own cached forward (Generator fast=False)")
    parser.add_argument("--quick", action="store_true", help="preset tiny, 8 prompts, 64 new tokens, 3 repeats")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.num_prompts, args.prompt_length, args.max_new_tokens, args.repeats = "tiny", 8, 32, 64, 3
    return args


def _build(args: argparse.Namespace, workdir: str):
    """(HF model, megalign LoadedModel) of the same random weights."""
    import transformers

    from megalign.convert import convert_hf_to_megalign
    from megalign.data.tokenizers import build_tokenizer
    from megalign.inference.model_loading import load_model
    from megalign.config.model import preset, to_hf_config

    config = preset(args.preset)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(config),
                                                                      attn_implementation="sdpa")).eval()
    hf_dir = os.path.join(workdir, "hf")
    hf_model.save_pretrained(hf_dir)
    convert_hf_to_megalign(hf_dir, os.path.join(workdir, "megalign"), progress=False)
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=config.vocab_size - 1)  # ids 0..vocab-1
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    loaded = load_model(os.path.join(workdir, "megalign"), dtype=args.dtype, device=args.device,
                        tokenizer=tokenizer, attention_backend="sdpa")
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    return hf_model.to(device=args.device, dtype=dtype), loaded


def _prompts(args: argparse.Namespace, vocab: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, args.prompt_length // 2), args.prompt_length + 1, (args.num_prompts,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def _run_megalign(loaded, prompts: List[List[int]], args: argparse.Namespace) -> List[List[int]]:
    from megalign.inference.generation import Generator
    from megalign.inference.sampling import GenerationParams

    generator = Generator(loaded.model, loaded.tokenizer, max_length=loaded.max_length, max_batch_size=args.batch_size,
                          stop_token_ids=loaded.stop_token_ids, fast=not args.reference)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, stop_token_ids=())
    out: List[List[int]] = []
    for start in range(0, len(prompts), args.batch_size):  # the same batches as the HF side
        out += [r.token_ids for r in generator.generate(prompts[start:start + args.batch_size], params)]
    return out


def _run_hf(hf_model, prompts: List[List[int]], args: argparse.Namespace) -> List[List[int]]:
    out: List[List[int]] = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            result = hf_model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                                       do_sample=False, max_new_tokens=args.max_new_tokens,
                                       min_new_tokens=args.max_new_tokens)
        out += result[:, width:].tolist()
    return out


def _timed(fn, *fn_args) -> tuple:
    """(wall seconds, process CPU seconds, result) of ``fn(*fn_args)``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*fn_args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, result


def _agreement(ours: List[List[int]], theirs: List[List[int]]) -> Dict[str, float]:
    tokens = sum(len(a) for a in theirs)
    same = sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b))
    rows = sum(a == b for a, b in zip(ours, theirs))
    return {"token_agreement": same / tokens, "rows_identical": rows / len(theirs)}


def main(argv: List[str]) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="megalign-generate-bench-") as workdir:
        hf_model, loaded = _build(args, workdir)
        prompts = _prompts(args, loaded.tokenizer.vocab_size)
        total = args.num_prompts * args.max_new_tokens
        print(f"model: preset {args.preset} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M "
              f"parameters), {args.dtype} on {args.device}, {args.threads} threads; {args.num_prompts} prompts of "
              f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, batch {args.batch_size}, "
              f"{args.max_new_tokens} new tokens each (greedy); megalign decoder: "
              f"{'reference (model forward)' if args.reference else 'fast'}", flush=True)
        warm = prompts[:args.batch_size]
        _run_megalign(loaded, warm, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}))
        _run_hf(hf_model, warm, argparse.Namespace(**{**vars(args), "max_new_tokens": 4}))
        times: Dict[str, List[float]] = {"megalign": [], "hf": []}
        cpu_times: Dict[str, List[float]] = {"megalign": [], "hf": []}
        outputs: Dict[str, List[List[int]]] = {}
        order = [side for r in range(args.repeats) for side in (("megalign", "hf") if r % 2 == 0 else ("hf", "megalign"))]
        for i, side in enumerate(order, 1):
            seconds, cpu, outputs[side] = (_timed(_run_megalign, loaded, prompts, args) if side == "megalign"
                                           else _timed(_run_hf, hf_model, prompts, args))
            times[side].append(seconds)
            cpu_times[side].append(cpu)
            print(f"[{i}/{len(order)}] {side}: {total} tokens in {seconds:.2f}s ({total / seconds:.1f} tokens/s; "
                  f"{cpu:.2f} CPU s)", flush=True)
    rates = {side: total / statistics.median(t) for side, t in times.items()}
    best = {side: total / min(t) for side, t in times.items()}
    agreement = _agreement(outputs["megalign"], outputs["hf"])
    ratio = rates["megalign"] / rates["hf"]
    cpu_ratio = statistics.median(cpu_times["hf"]) / statistics.median(cpu_times["megalign"])
    print(f"megalign generate:      {rates['megalign']:.1f} tokens/s (median), {best['megalign']:.1f} best")
    print(f"transformers generate(): {rates['hf']:.1f} tokens/s (median), {best['hf']:.1f} best")
    print(f"speedup (megalign/transformers tokens/s, median runs): {ratio:.2f}x  ({TARGET}); "
          f"best runs: {best['megalign'] / best['hf']:.2f}x; per CPU second (robust on a shared box with "
          f"--threads 1): {cpu_ratio:.2f}x")
    print(f"greedy ids agreeing with transformers: {100 * agreement['token_agreement']:.1f}% of tokens, "
          f"{100 * agreement['rows_identical']:.1f}% of prompts identical")
    print(f"total time {time.perf_counter() - started:.1f}s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "tokens_per_second": rates, "best_tokens_per_second": best,
                       "ratio": ratio, "cpu_ratio": cpu_ratio, "target": TARGET, **agreement}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
