"""Benchmark: random-access GPT sample reads/s, megalign vs megatron-core 0.16.1 GPTDataset, same run.

Writes a synthetic dataset with megalign's builder under benchmarks/_work/, builds the GPT indices
with both libraries (they are identical), then reads the same random sample ids through each
__getitem__ (tokens, labels, loss_mask, position_ids; megatron-core with create_attention_mask=False
so both do the same work), checks the outputs are equal and prints both rates and the ratio.
Both read from the page cache after a warm-up pass over the same ids.

    python benchmarks/sample_reads.py
    python benchmarks/sample_reads.py --num-documents 50000 --num-tokens 100000000 --num-reads 5000
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Callable, List, Optional

import numpy
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpt_index_build import (  # noqa: E402
    megalign_config,
    megatron_config,
    prepare_dataset,
    import_megatron,
)

from megalign.data.gpt_dataset import GPTDataset, Split  # noqa: E402
from megalign.data.index_cache import IndexCache  # noqa: E402
from megalign.data.indexed_dataset import IndexedDataset  # noqa: E402

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def reads_per_second(read: Callable[[int], object], ids: List[int], repeats: int) -> float:
    """Best rate over `repeats` passes reading every id once."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for idx in ids:
            read(idx)
        best = min(best, time.perf_counter() - start)
    return len(ids) / best


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-documents", type=int, default=200_000)
    parser.add_argument("--num-tokens", type=int, default=400_000_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--num-reads", type=int, default=20_000)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep benchmarks/_work/sample_reads afterwards")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    MegatronGPTDataset, MegatronIndexedDataset, MegatronSplit = import_megatron()

    prefix, _ = prepare_dataset(args, "sample_reads")
    work = os.path.dirname(prefix)
    try:
        ours_data = IndexedDataset(prefix)
        count = len(ours_data)
        theirs = MegatronGPTDataset(
            MegatronIndexedDataset(prefix),
            prefix,
            numpy.arange(0, count, dtype=numpy.int32),
            None,
            MegatronSplit.train,
            megatron_config(args, os.path.join(work, "cache_megatron"), prefix),
        )
        ours = GPTDataset(
            ours_data,
            prefix,
            (0, count),
            None,
            Split.train,
            megalign_config(args, None, prefix),
            IndexCache(os.path.join(work, "cache_megalign")),
        )
        ids = numpy.random.default_rng(args.seed).integers(0, len(ours), size=args.num_reads).tolist()
        for idx in ids[:1000]:
            mine, reference = ours[idx], theirs[idx]
            for field in FIELDS:
                if mine[field].dtype != reference[field].dtype or not torch.equal(mine[field], reference[field]):
                    print(f"MISMATCH: sample {idx} field {field} differs from megatron-core's")
                    return 1
        for dataset in (theirs, ours):  # warm-up: fault in the pages both will read
            for idx in ids:
                dataset[idx]
        theirs_rate = reads_per_second(theirs.__getitem__, ids, args.repeats)
        ours_rate = reads_per_second(ours.__getitem__, ids, args.repeats)
        print(
            f"reads: {args.num_reads:,} random samples of seq {args.seq_length} from {len(ours):,}; "
            "first 1,000 identical to megatron-core's"
        )
        print(f"megatron-core GPTDataset.__getitem__: {theirs_rate:,.0f} samples/s")
        print(f"megalign      GPTDataset.__getitem__: {ours_rate:,.0f} samples/s")
        print(f"speedup: {ours_rate / theirs_rate:.2f}x  (target >= 1.5x)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
