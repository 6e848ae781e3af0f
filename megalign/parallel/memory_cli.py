"""Report the theoretical memory per rank of a model preset at one or more parallel layouts.

Weights, fp32 gradient buffers, optimizer state (fp32 masters and Adam moments, sharded over data
parallelism with --use-distributed-optimizer) and stored activations on the busiest rank; the formulas
are in megalign/parallel/memory.py and docs/parallelism.md. Layouts are TPxPPxDP triples.
"""

from __future__ import annotations

import argparse
from typing import List, Tuple

from megalign.config.model import PRESETS, preset
from megalign.errors import ConfigError
from megalign.parallel.memory import Layout, estimate_memory

EXAMPLES = """examples:
  megalign estimate-memory --model-preset llama3-8b --layouts 2x1x4 4x1x2 --seq-length 8192 --sequence-parallel \\
      --use-distributed-optimizer --recompute-granularity selective
  megalign estimate-memory --model-preset llama3-70b --layouts 8x4x2 8x8x1 --micro-batch-size 1 --seq-length 8192
"""


def parse_layout(text: str) -> Tuple[int, int, int]:
    """``"TPxPPxDP"`` -> (tp, pp, dp); ConfigError naming the value otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--layouts {text!r}: write each layout as TPxPPxDP with positive integers, e.g. 4x2x8")
    tp, pp, dp = (int(p) for p in parts)
    return tp, pp, dp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-preset", required=True, choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--layouts", nargs="+", required=True, metavar="TPxPPxDP", help="layouts to report")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--fp32", action="store_true", help="fp32 training (default: bf16 with fp32 masters)")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    parser.add_argument(
        "--no-flash-attention",
        action="store_true",
        help="the attention kernel stores the [seq, seq] probabilities (SDPA math path)",
    )
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)


def rows(args: argparse.Namespace) -> List[str]:
    """One report line per layout."""
    config = preset(args.model_preset)
    lines = []
    for text in args.layouts:
        tp, pp, dp = parse_layout(text)
        layout = Layout(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            data_parallel_size=dp,
            micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length,
            bf16=not args.fp32,
            sequence_parallel=args.sequence_parallel and tp > 1,
            use_distributed_optimizer=args.use_distributed_optimizer,
            recompute_granularity=args.recompute_granularity,
            flash_attention=not args.no_flash_attention,
            num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        )
        lines.append(
            f"{args.model_preset} TP{tp} PP{pp} DP{dp} ({tp * pp * dp} ranks): "
            f"{estimate_memory(config, layout).describe()}"
        )
    return lines


def main(args: argparse.Namespace) -> int:
    for line in rows(args):
        print(line)
    return 0
