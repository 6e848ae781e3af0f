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

``--checkpoint`` measures instead each rank's peak extra memory (anonymous resident memory, RssAnon, above
the level before the call, sampled every 0.5 ms) while it saves a checkpoint and while it loads it into a
fresh model and optimizer, against its optimizer-state shard. The named baseline is the old behaviour of
the distributed optimizer, measured the same way: gather the full fp32 state on every rank
(``state_dict_tensors``), write it, and on loading read whole TP-local tensors and keep this rank's slice.

    python benchmarks/parallel_memory.py                          # small preset, four layouts on 4 ranks
    python benchmarks/parallel_memory.py --layouts 2x2x2 --zero1  # 8 ranks, distributed optimizer
    python benchmarks/parallel_memory.py --quick
    python benchmarks/parallel_memory.py --checkpoint --layouts 1x1x4 2x1x2   # save/load memory, ZeRO-1
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalign.checkpoint.sharded import read_local_shard, save_sharded_checkpoint
from megalign.checkpoint.storage import load_checkpoint
from megalign.config.sections import CheckpointingSection, OptimizationSection, ParallelSection
from megalign.model import ModelOptions, preset
from megalign.parallel import initialize_parallel
from megalign.parallel.memory import rank_parameters
from megalign.parallel.memory_cli import parse_layout
from megalign.training.checkpoint_io import CheckpointIO
from megalign.training.distributed_optimizer import build_optimizer
from megalign.training.model_chunks import ModelChunks
from megalign.training.optimizer import PREFIX, MixedPrecisionOptimizer

_MIB = float(1 << 20)


def _rss_anon() -> int:
    """This process's anonymous resident bytes (heap and anonymous mappings; file pages excluded)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only)")


class PeakMemory:
    """``with PeakMemory() as peak: ...``; then ``peak.extra``: the highest RssAnon above the level at entry."""

    def __enter__(self) -> "PeakMemory":
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _rank(rank: int, world: int, store: str, queue: Any, preset_name: str, tp: int, pp: int, zero1: bool,
          bf16: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        config = preset(preset_name)
        torch.manual_seed(0)
        model = ModelChunks(config, ModelOptions(), state, 1).to(torch.bfloat16 if bf16 else torch.float32)
        optimizer = build_optimizer(model, OptimizationSection(lr=1e-4),
                                    ParallelSection(use_distributed_optimizer=zero1), state)
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


def _built(preset_name: str, state: Any, zero1: bool) -> Any:
    torch.manual_seed(0)
    model = ModelChunks(preset(preset_name), ModelOptions(), state, 1).to(torch.bfloat16)
    return model, build_optimizer(model, OptimizationSection(lr=1e-4), ParallelSection(use_distributed_optimizer=zero1),
                                  state)


def _old_load(io: CheckpointIO, checkpoint: Any, optimizer: MixedPrecisionOptimizer) -> None:
    """The baseline loader: whole TP-local tensors of every parameter, then this rank's slice of them."""
    names = io.model.global_names()
    tensors = {}
    for local, param in io.model.named_parameters():
        for key in ("master", "exp_avg", "exp_avg_sq"):
            name = f"{PREFIX}{key}/{names[local]}"
            tensors[name] = read_local_shard(checkpoint, name, tuple(param.shape), io.global_shapes[names[local]],
                                             io.state)
        tensors[f"{PREFIX}step/{names[local]}"] = checkpoint.read_tensor(f"{PREFIX}step/{names[local]}")
    optimizer.load_state_dict_tensors(tensors, None, names)


def _checkpoint_rank(rank: int, world: int, store: str, queue: Any, preset_name: str, tp: int, pp: int,
                     zero1: bool, root: str) -> None:
    """Peak extra memory of one rank while saving and loading, new (sharded) and old (gathered) ways."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model, optimizer = _built(preset_name, state, zero1)
        (sum(p.float().sum() for p in model.parameters()) * 1e-3).backward()
        optimizer.step()
        extra = {"optimizer": optimizer.state_dict_json()}
        io = CheckpointIO(model, state, lambda _: None, CheckpointingSection(save=f"{root}/new"))
        figures: Dict[str, Any] = {"rank": rank, "shard": optimizer.state_numel() * 4,
                                   "full": 12 * sum(p.numel() for p in model.parameters()),
                                   "bucket": 4 * max(b.end - b.start for b in optimizer.grads.buckets)}
        dist.barrier()
        with PeakMemory() as peak:
            io.save(1, optimizer, config={}, consumed_samples=0, extra=extra)
        figures["save"] = peak.extra
        dist.barrier()
        with PeakMemory() as peak:  # the baseline: every rank gathers the full fp32 state, DP rank 0 writes it
            full = optimizer.state_dict_tensors(model.global_names())
            shapes = {**io.global_shapes, **io._optimizer_shapes(full)}
            save_sharded_checkpoint(f"{root}/old", 1, state, model.model_state(), full, shapes, extra=extra)
            del full
        figures["save_old"] = peak.extra
        for kind in ("new", "old"):
            fresh_model, fresh = _built(preset_name, state, zero1)
            fresh_io = CheckpointIO(fresh_model, state, lambda _: None)
            with load_checkpoint(f"{root}/{kind}") as checkpoint:
                dist.barrier()
                with PeakMemory() as peak:
                    fresh_io.load_weights(checkpoint)
                    if kind == "new":
                        fresh_io.load_optimizer(checkpoint, fresh, extra["optimizer"])
                    else:
                        _old_load(fresh_io, checkpoint, fresh)
            figures["load" if kind == "new" else "load_old"] = peak.extra
            fresh.close()
        queue.put(figures)
        optimizer.close()
    finally:
        dist.destroy_process_group()


def _spawn(target: Any, world: int, *args: Any) -> List[Dict[str, Any]]:
    """Run ``target(rank, world, store, queue, *args)`` on ``world`` gloo processes; their reports in rank order."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        processes = [context.Process(target=target, args=(r, world, store, queue, *args)) for r in range(world)]
        for process in processes:
            process.start()
        results = [queue.get(timeout=600) for _ in range(world)]
        for process in processes:
            process.join()
            if process.exitcode:
                raise RuntimeError(f"rank process exited with {process.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def measure(preset_name: str, tp: int, pp: int, dp: int, zero1: bool, bf16: bool) -> List[Dict[str, Any]]:
    """Per-rank figures of one layout, in rank order."""
    return _spawn(_rank, tp * pp * dp, preset_name, tp, pp, zero1, bf16)


def report_checkpoint(preset_name: str, layout: str, zero1: bool) -> None:
    tp, pp, dp = parse_layout(layout)
    print(f"\n{preset_name} TP{tp} PP{pp} DP{dp}, bf16, {'distributed' if zero1 else 'plain'} optimizer: peak extra "
          "MiB while saving / loading (new) vs the gather baseline (old)")
    print(f"{'rank':>4} | {'shard':>7} {'full':>7} {'bucket':>7} | {'save':>7} {'old':>7} | {'load':>7} {'old':>7}"
          " | save/shard load/shard")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # big buffers are mmapped: freed memory leaves RSS
    with tempfile.TemporaryDirectory() as root:
        results = _spawn(_checkpoint_rank, tp * pp * dp, preset_name, tp, pp, zero1, root)
    for r in results:
        cells = [r[key] / _MIB for key in ("shard", "full", "bucket", "save", "save_old", "load", "load_old")]
        print(f"{r['rank']:>4} | {cells[0]:7.2f} {cells[1]:7.2f} {cells[2]:7.2f} | {cells[3]:7.2f} {cells[4]:7.2f} | "
              f"{cells[5]:7.2f} {cells[6]:7.2f} | {r['save'] / r['shard']:9.2f} {r['load'] / r['shard']:9.2f}")


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
    parser.add_argument("--checkpoint", action="store_true", help="peak memory while saving and loading a checkpoint")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.layouts = "tiny", ["2x1x1", "1x1x2"]
    if args.checkpoint:
        for layout in args.layouts:
            report_checkpoint(args.preset, layout, args.zero1 or parse_layout(layout)[2] > 1)
        return
    for layout in args.layouts:
        report(args.preset, layout, args.zero1 or parse_layout(layout)[2] > 1, not args.fp32)


if __name__ == "__main__":
    main()
