"""The native-alignment pipeline, one stage per sub-command (the paper's four steps plus a quality report).

  dedup      exact and near-duplicate removal (MinHash-LSH over character n-grams)
  seed       choose the documents the expert annotates (random, or by perplexity under a checkpoint)
  annotate   the expert (any OpenAI-compatible chat API) rewrites them following the polishing guidelines
  build-sft  (original, rewritten) pairs -> the SFT records the worker is fine-tuned on
  rewrite    the worker rewrites the corpus (in-process generation or OpenAI-compatible servers)
  report     original vs aligned: perplexity, lengths, removed contact details, toxicity, kept facts

Every stage reads JSONL files, globs or another stage's output directory, writes JSONL parts plus a
manifest.json, finishes each record exactly once across crashes and reruns, and (where it makes sense)
splits its work with --shard-index i --num-shards n. See docs/alignment.md.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Dict, Tuple

EXAMPLES = """examples:
  megalign align dedup --input raw/ --output work/unique --threshold 0.8
  megalign align seed --input work/unique --output work/seed --num 1000 --strategy random
  megalign align annotate --input work/seed --output work/pairs --base-url https://api.openai.com/v1 --model gpt-4o
  megalign align build-sft --input work/pairs --output work/worker_sft.jsonl
  megalign align rewrite --input work/unique --output work/aligned --load worker_ckpt --shard-index 0 --num-shards 8
  megalign align report --aligned work/aligned --output work/report --load ckpt/llama3-8b
"""

# stage -> (module, one-line help)
STAGES: Dict[str, Tuple[str, str]] = {
    "dedup": ("megalign.align.dedup", "remove exact and near-duplicate documents"),
    "seed": ("megalign.align.seed", "choose the seed documents for expert annotation"),
    "annotate": ("megalign.align.annotate", "have an expert LLM rewrite the seed documents"),
    "build-sft": ("megalign.align.build_sft", "turn (original, rewritten) pairs into worker SFT records"),
    "rewrite": ("megalign.align.rewrite", "rewrite the corpus with the alignment worker"),
    "report": ("megalign.align.report", "compare the original and the aligned corpus (JSON, Markdown, PNG)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per stage; each stage module adds its own flags."""
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, (module_name, text) in STAGES.items():
        module = importlib.import_module(module_name)
        stage = sub.add_parser(
            name,
            help=text,
            description=(module.__doc__ or "").strip(),
            epilog=getattr(module, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(stage)


def main(args: argparse.Namespace) -> int:
    """Run the chosen stage."""
    module = importlib.import_module(STAGES[args.stage][0])
    return int(module.main(args) or 0)


def add_io_arguments(parser: argparse.ArgumentParser, sharded: bool = True) -> None:
    """--input/--output/--skip-bad-records (and --shard-index/--num-shards) shared by the stages."""
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), globs, or a stage's output directory",
    )
    parser.add_argument("--output", required=True, help="output directory (rerun with the same one to resume)")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip malformed lines and count them instead of stopping at the first",
    )
    if sharded:
        parser.add_argument("--shard-index", type=int, default=0, help="this process's shard (default 0)")
        parser.add_argument("--num-shards", type=int, default=1, help="number of shards (default 1)")
