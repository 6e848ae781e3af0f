"""Benchmark: building GPT dataset indices, megalign vs megatron-core 0.16.1 GPTDataset, same run.

Writes a synthetic dataset (random document lengths, fixed seed) with megalign's builder under
benchmarks/_work/, then times constructing a GPTDataset over all of it -- document, sample and
shuffle index built and written to a fresh cache directory -- with both libraries, checks that the
indices are equal and prints both times and the ratio. The default size is the issue's target:
2M documents, 4B tokens (~8 GB of uint16 tokens), sequence length 4096.

    python benchmarks/gpt_index_build.py
    python benchmarks/gpt_index_build.py --num-documents 200000 --num-tokens 400000000 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import numpy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megalign.data.gpt_dataset import GPTDataset, GPTDatasetConfig, Split  # noqa: E402
from megalign.data.index_cache import IndexCache  # noqa: E402
from megalign.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402

WORK_ROOT = os.path.join(REPO_ROOT, "benchmarks", "_work")
EOD, PAD = 0, 1


class TinyTokenizer:
    """What megatron-core's GPTDatasetConfig needs of a tokenizer: eod, pad, vocab size, identifiers."""

    eod = EOD
    pad = PAD
    vocab_size = None
    unique_identifiers = OrderedDict(class_name="TinyTokenizer")


def check_disk_space(directory: str, needed_bytes: int) -> None:
    """Exit with a clear message when `directory` lacks room for `needed_bytes` (plus 10%)."""
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.1:
        raise SystemExit(
            f"the benchmark needs ~{needed_bytes / 1e9:.1f} GB in {directory} but {free / 1e9:.1f} GB are free: "
            "lower --num-documents / --num-tokens"
        )


def synthetic_lengths(num_documents: int, num_tokens: int, seed: int) -> numpy.ndarray:
    """Uniformly random document lengths in [2, 2 * mean) (about num_tokens in total), fixed by seed."""
    rng = numpy.random.default_rng(seed)
    mean = num_tokens / num_documents
    return rng.integers(2, max(3, int(2 * mean) - 1), size=num_documents).astype(numpy.int32)


def write_dataset(prefix: str, lengths: numpy.ndarray, vocab_size: int, seed: int) -> float:
    """Write PREFIX.bin/.idx with megalign's builder (uint16, each document ends with EOD); seconds taken."""
    rng = numpy.random.default_rng(seed + 1)
    pool = rng.integers(PAD + 1, vocab_size, size=int(lengths.max()) + 65536).astype(numpy.uint16)
    starts = rng.integers(0, 65536, size=len(lengths))
    start_time = time.perf_counter()
    with IndexedDatasetBuilder(prefix, numpy.uint16) as builder:
        for length, start in zip(lengths.tolist(), starts.tolist()):
            document = pool[start : start + length].copy()  # windows of one random pool: cheap to make
            document[-1] = EOD
            builder.add_document(document)
    return time.perf_counter() - start_time


def prepare_dataset(args: argparse.Namespace, name: str) -> Tuple[str, float]:
    """Create the synthetic dataset for a benchmark; returns its prefix and the seconds writing took."""
    work = os.path.join(WORK_ROOT, name)
    shutil.rmtree(work, ignore_errors=True)
    check_disk_space(WORK_ROOT, args.num_tokens * 2 + args.num_documents * 20)
    os.makedirs(work)
    prefix = os.path.join(work, "synthetic_text_document")
    lengths = synthetic_lengths(args.num_documents, args.num_tokens, args.seed)
    seconds = write_dataset(prefix, lengths, args.vocab_size, args.seed)
    print(
        f"dataset: {args.num_documents:,} documents, {int(lengths.sum(dtype=numpy.int64)):,} tokens (uint16) "
        f"written in {seconds:.1f} s to {prefix}",
        flush=True,
    )
    return prefix, seconds


def import_megatron() -> Tuple[type, type, type]:
    """megatron-core's (GPTDataset, IndexedDataset, Split), imported without its optional-dependency warnings."""
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    return GPTDataset, IndexedDataset, Split


def megatron_config(args: argparse.Namespace, cache_dir: Optional[str], prefix: str):
    """megatron-core's GPTDatasetConfig for the benchmark settings."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MegatronConfig

    return MegatronConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=cache_dir,
        tokenizer=TinyTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def megalign_config(args: argparse.Namespace, cache_dir: Optional[str], prefix: str) -> GPTDatasetConfig:
    """megalign's GPTDatasetConfig for the same settings."""
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=cache_dir,
        eod_token=EOD,
        pad_token=PAD,
    )


def timed(function: Callable[[], object]) -> Tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def summary(times: List[float]) -> str:
    """best / median of a list of seconds."""
    return f"best {min(times):.3f} s, median {statistics.median(times):.3f} s over {len(times)} runs"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-documents", type=int, default=2_000_000)
    parser.add_argument("--num-tokens", type=int, default=4_000_000_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--num-samples", type=int, default=None, help="samples to build (default: one epoch)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep benchmarks/_work/gpt_index_build afterwards")
    args = parser.parse_args(argv)

    MegatronGPTDataset, MegatronIndexedDataset, MegatronSplit = import_megatron()

    prefix, _ = prepare_dataset(args, "gpt_index_build")
    work = os.path.dirname(prefix)
    try:
        ours_data = IndexedDataset(prefix)
        theirs_data = MegatronIndexedDataset(prefix)
        count = len(ours_data)
        documents = numpy.arange(0, count, dtype=numpy.int32)
        ours_times: List[float] = []
        theirs_times: List[float] = []
        ours = theirs = None
        for repeat in range(args.repeats):
            for side in ("megatron", "megalign") if repeat % 2 == 0 else ("megalign", "megatron"):
                cache_dir = os.path.join(work, f"cache_{side}_{repeat}")
                if side == "megatron":
                    config = megatron_config(args, cache_dir, prefix)
                    seconds, theirs = timed(
                        lambda: MegatronGPTDataset(theirs_data, prefix, documents, args.num_samples, MegatronSplit.train, config)
                    )
                    theirs_times.append(seconds)
                else:
                    config = megalign_config(args, cache_dir, prefix)
                    seconds, ours = timed(
                        lambda: GPTDataset(ours_data, prefix, (0, count), args.num_samples, Split.train, config, IndexCache(cache_dir))
                    )
                    ours_times.append(seconds)
                shutil.rmtree(cache_dir, ignore_errors=True)
        for name in ("document_index", "sample_index", "shuffle_index"):
            mine, reference = getattr(ours, name), getattr(theirs, name)
            if mine.dtype != reference.dtype or not numpy.array_equal(mine, reference):
                print(f"MISMATCH: {name} differs from megatron-core's ({mine.dtype} vs {reference.dtype})")
                return 1
        plan = ours.plan
        print(
            f"indices: seq {args.seq_length}, {len(ours):,} samples, {plan.num_epochs} epoch(s), "
            f"separate final epoch {plan.separate_final_epoch}; identical to megatron-core's"
        )
        print(f"megatron-core GPTDataset index build + cache write: {summary(theirs_times)}")
        print(f"megalign      GPTDataset index build + cache write: {summary(ours_times)}")
        ratio = min(theirs_times) / min(ours_times)
        print(f"speedup (best vs best): {ratio:.2f}x  (target >= 2x)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
