"""Choose the seed documents that the expert annotates (the paper's step 2 input).

Strategies (the paper compared seeds of high, low and random perplexity):
  random          N documents chosen uniformly at random
  ppl-high        the N documents with the highest perplexity under a reference model (--load or --hf-dir)
  ppl-low         the N with the lowest perplexity
  ppl-stratified  one document from each of N equal-sized perplexity strata (the whole range, evenly)

"Random" is a seeded hash of each record's id (``sha256("SEED:ID")``): the N smallest hashes are chosen,
so the choice does not depend on file order or sharding, and a rerun chooses the same documents. The
perplexity strategies score the ``--candidates`` documents with the smallest hashes (default: all of
them); scores are journaled in OUTPUT/scores/ so an interrupted run does not score a document twice.
The chosen records keep all their fields and get ``seed_strategy`` (and ``perplexity``), in input order.
The reference model takes the shared model flags (megalign/inference/model_flags.py): ``--device cuda
--dtype bf16`` scores on a GPU in bf16.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

from megalign.align.cli import add_io_arguments
from megalign.align.records import StageInput
from megalign.align.stage_output import ShardOutput
from megalign.errors import ConfigError
from megalign.inference.model_flags import MODEL_FLAGS, add_model_arguments, load_model_from_args, model_label
from megalign.utils.progress import ProgressMeter

__all__ = ["STRATEGIES", "hash_rank", "run_seed", "select_by_perplexity"]

EXAMPLES = """examples:
  megalign align seed --input work/unique --output work/seed --num 1000 --strategy random --seed 7
  megalign align seed --input work/unique --output work/seed_hi --num 1000 --strategy ppl-high \\
      --load ckpt/llama3-8b --candidates 50000 --device cuda --dtype bf16
  megalign align seed --input work/unique --output work/seed_lo --num 1000 --strategy ppl-low \\
      --hf-dir Meta-Llama-3-8B --device cuda --dtype bf16 --batch-size 16
"""

STRATEGIES = ("random", "ppl-high", "ppl-low", "ppl-stratified")
Scorer = Callable[[List[str]], List[float]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser, sharded=False)
    parser.add_argument("--num", type=int, required=True, help="number of seed documents to choose")
    parser.add_argument("--strategy", choices=STRATEGIES, default="random", help="how to choose (default random)")
    parser.add_argument("--seed", type=int, default=1234, help="random seed of the hash ranking (default 1234)")
    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="perplexity strategies: score only this many randomly chosen documents (default all)",
    )
    add_model_arguments(
        parser,
        title="reference model of the perplexity strategies (--load or --hf-dir)",
        batch_size_help="documents per scoring batch",
    )


def hash_rank(seed: int, rid: str) -> int:
    """The seeded random rank of record ``rid`` (smaller is chosen first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rid}".encode("utf-8")).digest()[:8], "big")


def _smallest_ranks(records: StageInput, seed: int, count: Optional[int]) -> Set[str]:
    """Ids of the ``count`` records with the smallest hash ranks (all ids when ``count`` is None)."""
    if count is None:
        return {record["id"] for record in records}
    heap: List[tuple] = []  # max-heap of the `count` smallest ranks, as negated ranks
    for record in records:
        item = (-hash_rank(seed, record["id"]), record["id"])
        if len(heap) < count:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    return {rid for _, rid in heap}


def select_by_perplexity(scores: Dict[str, float], num: int, strategy: str, seed: int) -> List[str]:
    """Ids chosen from ``scores`` (id -> perplexity) by a perplexity strategy; ties broken by hash rank."""
    ordered = sorted(scores, key=lambda rid: (scores[rid], hash_rank(seed, rid)))
    if strategy == "ppl-low":
        return ordered[:num]
    if strategy == "ppl-high":
        return ordered[::-1][:num]
    if strategy != "ppl-stratified":
        raise ValueError(f"not a perplexity strategy: {strategy!r}")
    num = min(num, len(ordered))
    chosen = []
    for stratum in range(num):  # stratum k covers ordered[k*L/num : (k+1)*L/num]
        members = ordered[stratum * len(ordered) // num : (stratum + 1) * len(ordered) // num]
        chosen.append(min(members, key=lambda rid: hash_rank(seed, rid)))
    return chosen


def _score_candidates(
    records: StageInput, candidates: Set[str], scorer: Scorer, scores_dir: Path, settings: dict, batch_size: int
) -> Dict[str, float]:
    """Perplexity of every candidate, journaled in ``scores_dir`` (resumable)."""
    with ShardOutput(scores_dir, "seed-scores", settings=settings) as journal:
        meter = ProgressMeter("seed: scoring", total=len(candidates) - len(journal.done_ids), unit="docs")
        batch: List[dict] = []

        def flush() -> None:
            for record, value in zip(batch, scorer([r["text"] for r in batch])):
                value = float(value)  # NaN: too short to score (fewer than 2 tokens); stored as null
                journal.write({"id": record["id"], "perplexity": value if math.isfinite(value) else None})
            meter.update(docs=len(batch))
            batch.clear()

        for record in records:
            if record["id"] in candidates and not journal.is_done(record["id"]):
                batch.append(record)
                if len(batch) >= batch_size:
                    flush()
        if batch:
            flush()
        journal.finish()
        meter.close()
    scores: Dict[str, float] = {}
    with open(journal.final_path, encoding="utf-8") as handle:  # written by this stage: one record per line
        for line in handle:
            record = json.loads(line)
            if record["perplexity"] is not None:  # unscorable documents are never chosen by perplexity
                scores[record["id"]] = record["perplexity"]
    return scores


def run_seed(
    inputs: Sequence[str],
    output: str,
    num: int,
    strategy: str = "random",
    seed: int = 1234,
    candidates: Optional[int] = None,
    scorer: Optional[Scorer] = None,
    skip_bad_records: bool = False,
    batch_size: int = 8,
    settings: Optional[dict] = None,
) -> dict:
    """Choose ``num`` seed documents from ``inputs`` into ``output``; returns the shard summary."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(f"--num {num!r} must be a positive integer")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy != "random" and scorer is None:
        raise ConfigError(
            f"--strategy {strategy} scores documents: pass --load CHECKPOINT (a reference model) or --hf-dir DIR"
        )
    settings = {"strategy": strategy, "num": num, "seed": seed, "candidates": candidates, **(settings or {})}
    records = StageInput(list(inputs), skip_bad_records=skip_bad_records)
    scores: Dict[str, float] = {}
    if strategy == "random":
        chosen = _smallest_ranks(records, seed, num)
    else:
        assert scorer is not None  # checked above: every other strategy scores
        pool = _smallest_ranks(records, seed, candidates)
        scores = _score_candidates(records, pool, scorer, Path(output) / "scores", settings, batch_size)
        chosen = set(select_by_perplexity(scores, num, strategy, seed))
    with ShardOutput(output, "seed", settings=settings) as out:
        for record in records:
            if record["id"] in chosen and not out.is_done(record["id"]):
                record["seed_strategy"] = strategy
                if record["id"] in scores:
                    record["perplexity"] = scores[record["id"]]
                out.write(record)
        summary = out.finish(
            {
                "available": len(scores) if scores else None,
                "chosen": len(chosen),
                "bad_records": records.stats.to_dict(),
            }
        )
    return summary


def main(args: argparse.Namespace) -> int:
    scorer = None
    extra = {}
    label = model_label(args)
    if args.strategy != "random":
        if label is None:
            raise ConfigError(f"--strategy {args.strategy} scores documents: pass {MODEL_FLAGS}")
        from megalign.inference.model_loading import perplexity_function

        loaded = load_model_from_args(args)
        scorer = perplexity_function(loaded, args.batch_size)
        # what determines the journaled scores: a rerun with another model or dtype is refused
        extra = {"load" if args.load else "hf_dir": str(Path(label).resolve()), "dtype": args.dtype}
        if args.ckpt_step is not None:
            extra["ckpt_step"] = args.ckpt_step
    summary = run_seed(
        args.input,
        args.output,
        args.num,
        args.strategy,
        args.seed,
        args.candidates,
        scorer,
        args.skip_bad_records,
        args.batch_size,
        extra,
    )
    print(f"seed: chose {summary['records']} documents ({args.strategy}) -> {args.output}")
    return 0
