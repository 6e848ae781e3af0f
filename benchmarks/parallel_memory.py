#!/usr/bin/env python3
"""Benchmark: per-rank memory of a parallel layout, measured on gloo ranks, against the theoretical figures.

For each layout (TPxPPxDP, world = product) this script starts that many local processes (gloo), builds the
rank's model chunks in the chosen dtype and the optimizer the trainer would build (with or without
``--use-distributed-optimizer``), runs one optimizer step so the Adam state exists, and reports per rank:

* weight bytes (the parameters it holds) against ``megalign.parallel.memory.rank_parameters`` x dtype size;
* fp32 gradient-buffer bytes against 4 x the rank's parameters (plus bucket padding);
* optimizer bytes (fp32 masters when bf16, Adam moments) against ``(4 + 8) / DP`` (ZeRO-1) or ``4 + 8``
  bytes per parameter (``8`` in fp32, where the master is the weight itself).

The ratio column is measured / theoretical; 1.00 means the 1/TP, 1/PP and 1/DP splits hold exactly.

    python benchmarks/parallel_memory.py                          # small preset, four layouts on 4 ranks
    python benchmarks/parallel_memory.py --layouts 2x2x2 --zero1  # 8 ranks, distributed optimizer
    python benchmarks/parallel_memory.py --quick
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalign.config.sections import OptimizationSection, ParallelSection
from megalign.model import ModelOptions, preset
from megalign.parallel import initialize_parallel
from megalign.parallel.memory import rank_parameters
from megalign.parallel.memory_cli import parse_layout
from megalign.training.distributed_optimizer import build_optimizer
from megalign.training.model_chunks import ModelChunks

_MIB = float(1 << 20)


def _rank(rank: int, world: int, store: str, queue: Any, preset_name: str, tp: int, pp: int, zero1: bool,
          bf16: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        config = preset(preset_name)
        torch.manual_seed(0)
        model = ModelChunks(config, ModelOptions(), state, 1).to(torch.bfloat16 if bf16 else torch.float32)
        optimizer = build_optimizer(model, OptimizationSection(lr=1e-4), ParallelSection(use_distributed_optimizer=zero1),
                                    state)
        (sum(p.float().sum() for p in model.parameters()) * 0.0).backward()
        optimizer.step()
        stage = model.chunks[0].stage
        params = sum(p.numel() for p in model.parameters())
        queue.put({"rank": rank, "tp": state.tensor_model_parallel_rank, "pp": state.pipeline_model_parallel_rank,
                   "dp": state.data_parallel_rank, "dp_size": state.data_parallel_size, "params": params,
                   "theory_params": rank_parameters(config, tp, len(stage.layers), stage.first, stage.last),
                   "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                   "grad_bytes": sum(b.data.numel() * b.data.element_size() for b in optimizer.grads.buffers),
                   "optimizer_bytes": optimizer.state_numel() * 4})
        optimizer.close()
    finally:
        dist.destroy_process_group()


def measure(preset_name: str, tp: int, pp: int, dp: int, zero1: bool, bf16: bool) -> List[Dict[str, Any]]:
    """Per-rank figures of one layout, in rank order."""
    world = tp * pp * dp
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        processes = [context.Process(target=_rank, args=(r, world, store, queue, preset_name, tp, pp, zero1, bf16))
                     for r in range(world)]
        for process in processes:
            process.start()
        results = [queue.get(timeout=600) for _ in range(world)]
        for process in processes:
            process.join()
            if process.exitcode:
                raise RuntimeError(f"rank process exited with {process.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def report(preset_name: str, layout: str, zero1: bool, bf16: bool) -> None:
    tp, pp, dp = parse_layout(layout)
    weight_size = 2 if bf16 else 4
    optimizer_per_param = (4 + 8 if bf16 else 8) / (dp if zero1 else 1)
    print(f"\n{preset_name} TP{tp} PP{pp} DP{dp}, {'bf16' if bf16 else 'fp32'}, "
          f"{'distributed optimizer' if zero1 else 'plain optimizer'} (measured MiB / theoretical MiB = ratio)")
    print(f"{'rank':>4} {'tp':>2} {'pp':>2} {'dp':>2} | {'weights':>22} | {'fp32 grads':>22} | {'optimizer':>22}")
    for r in measure(preset_name, tp, pp, dp, zero1, bf16):
        theory = r["theory_params"]
        cells = []
        for measured, expected in ((r["weight_bytes"], theory * weight_size), (r["grad_bytes"], theory * 4),
                                   (r["optimizer_bytes"], theory * optimizer_per_param)):
            cells.append(f"{measured / _MIB:7.2f} / {expected / _MIB:7.2f} = {measured / expected:4.2f}")
        print(f"{r['rank']:>4} {r['tp']:>2} {r['pp']:>2} {r['dp']:>2} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layouts", nargs="+", default=["4x1x1", "1x4x1", "2x2x1", "1x1x4"], metavar="TPxPPxDP")
    parser.add_argument("--zero1", action="store_true", help="use the distributed optimizer")
    parser.add_argument("--fp32", action="store_true", help="fp32 weights (default bf16 with fp32 masters)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, two layouts")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.layouts = "tiny", ["2x1x1", "1x1x2"]
    for layout in args.layouts:
        report(args.preset, layout, args.zero1 or parse_layout(layout)[2] > 1, not args.fp32)


if __name__ == "__main__":
    main()
