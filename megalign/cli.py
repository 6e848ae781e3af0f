"""The `megalign` command: one subcommand per pipeline step (see README.md, "Command line").

Each subcommand lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
tools/*.py call `run_command` with the same flags. Heavy imports (torch, transformers) stay inside
the subcommand modules' functions so that `megalign --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

from megalign.errors import MegalignError

# name -> (module, one-line help)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "preprocess": ("megalign.data.preprocess", "tokenize JSONL corpora into Megatron .bin/.idx files"),
    "train-tokenizer": (
        "megalign.data.tokenizer_training",
        "train a SentencePiece or Hugging Face BPE tokenizer on JSONL text",
    ),
    "merge-datasets": ("megalign.data.merge_datasets", "merge finished .bin/.idx shards into one dataset"),
    "train": ("megalign.training.trainer", "train a GPT model on preprocessed data (pretrain_gpt.py)"),
    "convert": (
        "megalign.convert.cli",
        "convert checkpoints between Hugging Face and megalign (hf-to-megalign, megalign-to-hf)",
    ),
    "align": ("megalign.align.cli", "native-alignment stages: dedup, seed, annotate, build-sft, rewrite"),
    "serve": ("megalign.inference.serve_cli", "serve a checkpoint over an OpenAI-compatible HTTP API"),
    "estimate-memory": ("megalign.parallel.memory_cli", "theoretical memory per rank of a preset at TPxPPxDP layouts"),
    "demo": ("megalign.demo", "run the end-to-end demo on the shipped sample corpus (CPU)"),
}


def _load(command: str):
    module_name, _ = COMMANDS[command]
    return importlib.import_module(module_name)


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (its module docstring is the description)."""
    module = _load(command)
    parser = argparse.ArgumentParser(
        prog=f"megalign {command}",
        description=(module.__doc__ or "").strip(),
        epilog=getattr(module, "EXAMPLES", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser


def run_command(command: str, argv: List[str]) -> int:
    """Parse `argv` for `command` and run it; user errors print one message and return 2."""
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(_load(command).main(args) or 0)
    except MegalignError as error:
        print(f"megalign {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megalign {command}: interrupted", file=sys.stderr)
        return 130


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: megalign <command> [options]   (megalign <command> --help for details)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from megalign import __version__

        print(f"megalign {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"megalign: unknown command '{command}'\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    return run_command(command, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
