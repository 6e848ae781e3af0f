"""Merge finished .bin/.idx datasets (e.g. preprocessing shards) into one dataset, in order.

The inputs are validated and must share one token dtype; the output is byte-identical to writing all
their documents at once and is readable by Megatron-LM. Like Megatron-LM's tools/merge_datasets.py,
--input also accepts a directory: every complete PREFIX.bin/PREFIX.idx pair in it, sorted by name.
Nothing appears at --output-prefix until the merged dataset is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

from megalign.data.indexed_dataset import (
    IndexedDataset,
    data_file_path,
    index_file_path,
    merge_datasets,
)
from megalign.errors import ConfigError

EXAMPLES = """examples:
  # shards named on the command line, merged in the order given
  megalign merge-datasets --input data/shard0_text_document data/shard1_text_document \\
      --output-prefix data/corpus_text_document

  # every PREFIX.bin/PREFIX.idx pair in a directory, sorted by name
  megalign merge-datasets --input-dir data/shards --output-prefix data/corpus_text_document

  # Megatron-LM style (tools/merge_datasets.py takes a directory as --input)
  python tools/merge_datasets.py --input data/shards --output-prefix data/corpus_text_document
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `megalign merge-datasets`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PREFIX",
        help="dataset prefixes (PREFIX.bin + PREFIX.idx; a trailing .bin/.idx is ignored) or directories "
        "whose complete pairs are taken in sorted order",
    )
    source.add_argument("--input-dir", metavar="DIR", help="merge every complete .bin/.idx pair in DIR, sorted")
    parser.add_argument("--output-prefix", required=True, help="write OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def find_dataset_prefixes(directory: str) -> List[str]:
    """Prefixes of the complete .bin/.idx pairs in `directory`, sorted; lone halves are reported and skipped."""
    if not os.path.isdir(directory):
        raise ConfigError(f"--input-dir {directory}: not a directory")
    names = set(os.listdir(directory))
    stems = sorted({name[:-4] for name in names if name.endswith((".bin", ".idx")) and not name.startswith(".")})
    prefixes = []
    for stem in stems:
        prefix = os.path.join(directory, stem)
        if f"{stem}.bin" in names and f"{stem}.idx" in names:
            prefixes.append(prefix)
        else:
            present, missing = (".bin", ".idx") if f"{stem}.bin" in names else (".idx", ".bin")
            print(f"merge-datasets: warning: skipping {prefix}{present}: no matching {missing}", file=sys.stderr)
    if not prefixes:
        raise ConfigError(f"{directory}: no complete PREFIX.bin/PREFIX.idx pairs to merge")
    return prefixes


def _strip_suffix(prefix: str) -> str:
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def resolve_inputs(args: argparse.Namespace) -> List[str]:
    """The input prefixes, in merge order; a directory scan never picks up the output itself."""
    output = os.path.realpath(args.output_prefix)
    items = [args.input_dir] if args.input_dir else args.input
    prefixes: List[str] = []
    for item in items:
        if args.input_dir or os.path.isdir(item):
            found = find_dataset_prefixes(item)
            prefixes += [prefix for prefix in found if os.path.realpath(prefix) != output]
        else:
            prefixes.append(_strip_suffix(item))
    if not prefixes:
        raise ConfigError("nothing to merge: the only dataset found is the output itself")
    return prefixes


def main(args: argparse.Namespace) -> int:
    """Merge the inputs and print a one-line summary."""
    prefixes = resolve_inputs(args)
    merge_datasets(prefixes, args.output_prefix, progress=not args.quiet)
    merged = IndexedDataset(args.output_prefix)
    print(
        f"merged {len(prefixes)} datasets into {data_file_path(args.output_prefix)} and "
        f"{index_file_path(args.output_prefix)}: {merged.num_documents} documents, {len(merged)} sequences, "
        f"{merged.num_tokens} tokens ({merged.dtype.name})"
    )
    return 0
