#!/usr/bin/env python3
"""Benchmark: peak memory (RSS) of checkpoint conversion against the model's size on disk.

Writes a synthetic Hugging Face ``LlamaForCausalLM`` folder (random bf16 weights, one safetensors shard per
decoder layer plus one for the embedding/head, with ``model.safetensors.index.json``; the generator holds one
layer at a time), then runs in separate processes, each timed, its peak RSS read from its own ``VmHWM``:

* ``import``: a process that only imports ``megalign.convert`` (the interpreter + torch baseline);
* ``hf-to-megalign``: ``convert_hf_to_megalign`` at the chosen TP x PP;
* ``megalign-to-hf``: ``convert_megalign_to_hf`` back to a bf16 HF folder.

It prints each one's peak RSS and peak anonymous RSS, each less the import baseline, as fractions of the
model's bytes on disk, against the target line "target: peak under 25% of the model size".

    python benchmarks/convert_memory.py             # TinyLlama shape: 1.1B parameters, ~2.2 GB in bf16
    python benchmarks/convert_memory.py --quick     # ~120M parameters
    python benchmarks/convert_memory.py --workdir /tmp/convmem --tp 4 --pp 1
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import safetensors.torch
import torch

from megalign.config.model import ModelConfig, to_hf_config
from megalign.model.hf_weights import weight_names

_MIB = float(1 << 20)
TARGET = 0.25

CONVERT_IN = ("from megalign.convert import convert_hf_to_megalign as c; "
              "c({hf!r}, {ckpt!r}, {tp}, {pp}, progress=False)")
CONVERT_OUT = ("from megalign.convert import convert_megalign_to_hf as c; "
               "c({ckpt!r}, {out!r}, dtype='bf16', progress=False)")
IMPORT_ONLY = "import megalign.convert"


def write_synthetic_llama(config: ModelConfig, folder: Path) -> int:
    """Write a random bf16 HF Llama folder of ``config``'s shape, one layer in memory at a time; returns the
    weight bytes on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: Dict[str, List[Tuple[str, Tuple[int, ...]]]] = {}
    for _, hf_name, shape in weight_names(config):
        parts = hf_name.split(".")
        key = f"layer{int(parts[2]):04d}" if parts[1] == "layers" else "outer"
        groups.setdefault(key, []).append((hf_name, shape))
    generator = torch.Generator().manual_seed(0)
    weight_map: Dict[str, str] = {}
    total = 0
    keys = sorted(groups)
    for index, key in enumerate(keys):
        fname = f"model-{index + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        for name, shape in groups[key]:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
        safetensors.torch.save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += (folder / fname).stat().st_size
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (folder / "config.json").write_text(json.dumps({**to_hf_config(config), "torch_dtype": "bfloat16"}, indent=2))
    return total


def _status_kib(pid: int, fields: Tuple[str, ...]) -> Dict[str, int]:
    """``{field: kiB}`` from ``/proc/PID/status`` (empty once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if line.split(":")[0] in fields}


def measure(code: str) -> Tuple[float, float, float]:
    """Run ``python -c code``; returns (peak RSS, peak anonymous RSS, both in bytes, seconds).

    The peak RSS is the child's own ``VmHWM`` read at its end (``ru_maxrss`` of a child would include this
    large parent's memory, held between ``fork`` and ``exec``). RSS counts the memory-mapped safetensors
    pages the child has read; the anonymous part (``RssAnon``, sampled every 10 ms) is the memory it
    allocated itself."""
    report = "import re\nprint('VmHWM', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1])"
    wrapped = f"{code}\n{report}"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", wrapped], stdout=subprocess.PIPE, text=True)
    anon = 0
    while process.poll() is None:
        anon = max(anon, _status_kib(process.pid, ("RssAnon",)).get("RssAnon", 0))
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    stdout = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise SystemExit(f"subprocess failed (exit {process.returncode}): {code}")
    peak_kib = [line.split()[1] for line in stdout.splitlines() if line.startswith("VmHWM ")]
    return int(peak_kib[-1]) * 1024.0, anon * 1024.0, seconds


def _folder_bytes(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}"))


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--num-layers", type=int, default=22)
    parser.add_argument("--num-attention-heads", type=int, default=32)
    parser.add_argument("--num-key-value-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the imported checkpoint")
    parser.add_argument("--pp", type=int, default=2, help="pipeline-parallel size of the imported checkpoint")
    parser.add_argument("--quick", action="store_true", help="a ~120M-parameter model (hidden 768, 12 layers)")
    parser.add_argument("--workdir", help="where the folders go (kept); default: a temporary folder, removed")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden_size, args.intermediate_size, args.num_layers = 768, 2048, 12
        args.num_attention_heads, args.num_key_value_heads = 12, 4
    config = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                         num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                         max_position_embeddings=2048)
    params = sum(torch.Size(shape).numel() for _, _, shape in weight_names(config))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convert_memory_"))
    try:
        hf, ckpt, out = work / "hf", work / "ckpt", work / "hf_out"
        for path in (hf, ckpt, out):
            shutil.rmtree(path, ignore_errors=True)
        started = time.perf_counter()
        size = write_synthetic_llama(config, hf)
        print(f"model: {params / 1e9:.3f}B parameters, bf16, {size / 1e9:.2f} GB on disk ({hf}); "
              f"written in {time.perf_counter() - started:.0f}s", flush=True)
        runs = [("import", IMPORT_ONLY),
                (f"hf-to-megalign TP{args.tp}xPP{args.pp}", CONVERT_IN.format(hf=str(hf), ckpt=str(ckpt),
                                                                             tp=args.tp, pp=args.pp)),
                ("megalign-to-hf bf16", CONVERT_OUT.format(ckpt=str(ckpt), out=str(out)))]
        results = [(name, *measure(code)) for name, code in runs]
        print(f"checkpoint: {_folder_bytes(ckpt, '.safetensors') / 1e9:.2f} GB; "
              f"exported: {_folder_bytes(out, '.safetensors') / 1e9:.2f} GB")
        baseline, anon_baseline = results[0][1], results[0][2]
        print(f"{'process':<24}{'time':>8}{'peak RSS':>12}{'/size':>8}{'- import':>12}{'/size':>8}"
              f"{'anon peak':>12}{'- import':>12}{'/size':>8}")
        for name, peak, anon, seconds in results:
            extra, anon_extra = peak - baseline, anon - anon_baseline
            print(f"{name:<24}{seconds:>7.1f}s{peak / _MIB:>8.0f} MiB{peak / size:>8.1%}{extra / _MIB:>8.0f} MiB"
                  f"{extra / size:>8.1%}{anon / _MIB:>8.0f} MiB{anon_extra / _MIB:>8.0f} MiB{anon_extra / size:>8.1%}")
        worst = max(peak - baseline for _, peak, _, _ in results[1:])
        print(f"target: peak under {TARGET:.0%} of the model size -> worst peak RSS above the import baseline "
              f"{worst / size:.1%} ({'met' if worst < TARGET * size else 'NOT met'})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
