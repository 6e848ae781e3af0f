"""Remove exact and near-duplicate documents (the paper's step 1: deduplicate the web corpus).

Keys: every record's text is compared in its normalised form (text_signals.normalize_for_match: NFKC,
case-folded, Arabic diacritics and tatweel removed, alef/ya/ta-marbuta variants folded, digits ASCII,
whitespace runs collapsed). The normalisation is for the keys only: kept records are written unchanged.

  exact  records with equal keys (128-bit BLAKE2b of the key) form a cluster;
  near   MinHash signatures of the keys' character --ngram sets (--num-perm hash functions), LSH banding
         (--bands, default: chosen for --threshold as datasketch does) gives candidate pairs; a pair whose
         estimated Jaccard similarity is >= --threshold is linked, and linked records form clusters.

Each cluster keeps its first record in input order and removes the rest; OUTPUT/dedup_report.json counts
them and lists the clusters (keeper id, removed ids, estimated similarity to the keeper), capped at
--report-limit clusters of at most 100 ids each, with totals.

Sharding: with --shard-index i --num-shards n a process sketches only input shard i (records k with
k % n == i) into OUTPUT/signatures/; a run with --num-shards n and no --shard-index (or with --finalize)
then clusters all shards' sketches globally and writes one output part per input shard
(part-0000i-of-0000n.jsonl, so the next stage can shard the same way). A run without shard flags does
both. The result does not depend on n. Every step resumes after a crash: finished shards are not
sketched again and the output parts finish each record exactly once.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megalign.align.dedup_shards import (
    SIGNATURES_DIR,
    SignatureShards,
    SignatureShardWriter,
    check_settings,
    load_signature_shards,
    read_shard_meta,
)
from megalign.align.minhash import MinHasher, band_hashes, candidate_pairs, optimal_bands
from megalign.align.records import StageInput, check_shard_flags
from megalign.align.stage_output import ShardOutput
from megalign.align.text_signals import normalize_for_match
from megalign.data.jsonl import BadRecordStats
from megalign.errors import BadRecordError, ConfigError, DataFormatError
from megalign.utils.atomic import write_json_atomic
from megalign.utils.progress import ProgressMeter

__all__ = [
    "Clusters",
    "DedupConfig",
    "REPORT_FILE",
    "Sketcher",
    "cluster_duplicates",
    "dedup_key",
    "exact_hashes",
    "finalize",
    "run_dedup",
    "sketch_shard",
]

EXAMPLES = """examples:
  megalign align dedup --input 'raw/*.jsonl' --output work/unique
  megalign align dedup --input raw/ --output work/unique --threshold 0.85 --ngram 5 --num-perm 256
  # sharded (e.g. a SLURM array of 8 tasks), then one finalise that clusters globally and writes 8 parts:
  megalign align dedup --input raw/ --output work/unique --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8
  megalign align dedup --input raw/ --output work/unique --num-shards 8 --finalize
"""

REPORT_FILE = "dedup_report.json"
NORMALIZATION = "normalize_for_match/1"
KEPT, EXACT, NEAR, DUPLICATE_ID = 0, 1, 2, 3
_MAX_LISTED_PER_CLUSTER = 100
_BUCKET_WINDOW = 64  # within an LSH bucket, each record is compared with at most this many earlier ones
_VERIFY_PAIRS = 32768  # candidate pairs verified per block


@dataclass(frozen=True)
class DedupConfig:
    """The settings that determine the result of dedup."""

    threshold: float = 0.8
    ngram: int = 5
    num_perm: int = 128
    bands: Optional[int] = None
    seed: int = 1
    batch_size: int = 256
    report_limit: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"--threshold {self.threshold!r} must be in (0, 1]")
        if isinstance(self.num_perm, bool) or not isinstance(self.num_perm, int) or self.num_perm < 2:
            raise ConfigError(f"--num-perm {self.num_perm!r} must be an integer >= 2")
        if self.bands is not None and not 1 <= self.bands <= self.num_perm:
            raise ConfigError(f"--bands {self.bands!r} must be in [1, --num-perm {self.num_perm}]")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size!r} must be >= 1")
        if self.report_limit < 0:
            raise ConfigError(f"--report-limit {self.report_limit!r} must be >= 0")
        MinHasher(self.num_perm, self.ngram, self.seed)  # validates --ngram

    def band_layout(self) -> Tuple[int, int]:
        """(bands, rows): --bands with rows = num_perm // bands, or the optimum for --threshold."""
        if self.bands is None:
            return optimal_bands(self.threshold, self.num_perm)
        return self.bands, self.num_perm // self.bands

    def sketch_settings(self, files: Sequence[str]) -> Dict[str, Any]:
        """What determines a shard's sketches (a finalise refuses sketches made with other values)."""
        bands, rows = self.band_layout()
        return {
            "normalization": NORMALIZATION,
            "ngram": self.ngram,
            "num_perm": self.num_perm,
            "bands": bands,
            "rows": rows,
            "seed": self.seed,
            "inputs": list(files),
        }

    def output_settings(self, files: Sequence[str]) -> Dict[str, Any]:
        """What determines the output parts (a resumed finalise must use the same)."""
        return {**self.sketch_settings(files), "threshold": self.threshold, "report_limit": self.report_limit}


def dedup_key(text: str) -> str:
    """The normalised form of ``text`` that dedup compares (never written out)."""
    return normalize_for_match(text)


def exact_hashes(keys: Sequence[str]) -> np.ndarray:
    """(len(keys), 2) uint64: the 128-bit BLAKE2b of each key's UTF-8 bytes."""
    digests = b"".join(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest() for key in keys)
    return np.frombuffer(digests, dtype="<u8").reshape(len(keys), 2).astype(np.uint64)


class Sketcher:
    """Keys, exact hashes, MinHash signatures and LSH band hashes of batches of texts."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.hasher = MinHasher(config.num_perm, config.ngram, config.seed)
        self.bands, self.rows = config.band_layout()

    def sketch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(exact (n, 2) uint64, signatures (n, num_perm) uint32, band hashes (n, bands) uint64)."""
        keys = [dedup_key(text) for text in texts]
        signatures = self.hasher.signatures(keys)
        return exact_hashes(keys), signatures, band_hashes(signatures, self.bands, self.rows, self.config.seed)


# ---- clustering --------------------------------------------------------------------------------------------
@dataclass
class Clusters:
    """Per record (in input order): its keeper's position, why it is removed, and its similarity to the keeper."""

    keeper: np.ndarray  # int64: own position when kept
    kind: np.ndarray  # int8: KEPT, EXACT, NEAR (DUPLICATE_ID is set by the stage)
    similarity: np.ndarray  # float32: estimated Jaccard with the keeper (1.0 for exact duplicates)
    candidate_pairs: int
    linked_pairs: int


def _first_of_components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """For each node 0..num_nodes-1, the smallest node of its connected component (union-find)."""
    parent = list(range(num_nodes))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in edges.tolist():
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return np.asarray([find(node) for node in range(num_nodes)], dtype=np.int64)


def cluster_duplicates(
    exact: np.ndarray,
    bands: np.ndarray,
    signature_rows: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    window: int = _BUCKET_WINDOW,
) -> Clusters:
    """Exact clusters (equal ``exact`` rows), then near clusters among the first of each exact cluster.

    Rows are records in input order; ``signature_rows(positions)`` returns their MinHash signatures. A
    candidate pair from the LSH ``bands`` is linked when its estimated Jaccard is >= ``threshold``; each
    cluster's keeper is its first record.
    """
    count = len(exact)
    positions = np.arange(count, dtype=np.int64)
    keeper = positions.copy()
    kind = np.zeros(count, dtype=np.int8)
    similarity = np.ones(count, dtype=np.float32)
    if count == 0:
        return Clusters(keeper, kind, similarity, 0, 0)
    records = np.ascontiguousarray(exact, dtype=np.uint64).view([("high", "<u8"), ("low", "<u8")]).ravel()
    _, first, inverse = np.unique(records, return_index=True, return_inverse=True)
    keeper = first.astype(np.int64)[inverse.ravel()]
    kind[keeper != positions] = EXACT

    representatives = np.flatnonzero(keeper == positions)
    pairs = representatives[candidate_pairs(bands[representatives], window)]
    linked: List[np.ndarray] = []
    for begin in range(0, len(pairs), _VERIFY_PAIRS):
        block = pairs[begin : begin + _VERIFY_PAIRS]
        first_sigs, second_sigs = signature_rows(block[:, 0]), signature_rows(block[:, 1])
        matches = np.count_nonzero(first_sigs == second_sigs, axis=1)
        linked.append(block[matches >= threshold * first_sigs.shape[1] - 1e-9])
    edges = np.concatenate(linked) if linked else np.empty((0, 2), dtype=np.int64)
    if len(edges):
        nodes, local = np.unique(edges, return_inverse=True)
        roots = nodes[_first_of_components(len(nodes), local.reshape(-1, 2))]
        removed = roots != nodes
        near, near_keeper = nodes[removed], roots[removed]
        keeper[near], kind[near] = near_keeper, NEAR
        sims: List[np.ndarray] = []
        for begin in range(0, len(near), _VERIFY_PAIRS):
            a = signature_rows(near[begin : begin + _VERIFY_PAIRS])
            b = signature_rows(near_keeper[begin : begin + _VERIFY_PAIRS])
            sims.append(np.mean(a == b, axis=1))
        similarity[near] = np.concatenate(sims)
    return Clusters(keeper, kind, similarity, int(len(pairs)), int(len(edges)))


# ---- the sketch pass (one shard) ---------------------------------------------------------------------------
def _signatures_root(output: str) -> Path:
    return Path(output) / SIGNATURES_DIR


def sketch_shard(
    inputs: Sequence[str],
    output: str,
    shard_index: int = 0,
    num_shards: int = 1,
    config: DedupConfig = DedupConfig(),
    skip_bad_records: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Sketch input shard ``shard_index`` into OUTPUT/signatures/ (skipped when already done); returns its meta."""
    stage = StageInput(inputs, shard_index, num_shards, skip_bad_records, duplicate_ids="keep")
    settings = config.sketch_settings(stage.files)
    root = _signatures_root(output)
    done = read_shard_meta(root, shard_index, num_shards)
    if done is not None:
        check_settings(done, settings, root)
        return done
    sketcher = Sketcher(config)
    writer = SignatureShardWriter(root, shard_index, num_shards, settings)
    meter = ProgressMeter(
        f"dedup: sketching shard {shard_index}/{num_shards}", total=stage.count(), unit="docs", enabled=progress
    )
    ids: List[str] = []
    texts: List[str] = []
    ordinals: List[int] = []

    def flush() -> None:
        exact, signatures, bands = sketcher.sketch(texts)
        writer.add(ids, np.asarray(ordinals, dtype=np.int64), exact, signatures, bands)
        meter.update(docs=len(texts), chars=sum(len(t) for t in texts))
        ids.clear()
        texts.clear()
        ordinals.clear()

    try:
        for count, record in enumerate(stage):
            # records of this shard are input records shard_index, shard_index + n, ...; skipped ones count too
            ordinals.append((count + stage.stats.total) * num_shards + shard_index)
            ids.append(record["id"])
            texts.append(record["text"])
            if len(texts) >= config.batch_size:
                flush()
        if texts:
            flush()
        meta = writer.finish(config.num_perm, sketcher.bands, {"bad_records": stage.stats.to_dict()})
    except BaseException:
        writer.abort()
        raise
    meter.close()
    return meta


# ---- the finalise (global) ---------------------------------------------------------------------------------
def _merged_bad_records(metas: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Bad-record counts of all shards; examples are the first ones in input order (as in an unsharded run)."""
    stats = BadRecordStats()
    examples: List[str] = []
    for meta in metas:
        for reason, count in meta["bad_records"]["counts"].items():
            stats.counts[reason] = stats.counts.get(reason, 0) + count
        examples.extend(meta["bad_records"]["examples"])

    def place(example: str) -> Tuple[str, int]:
        path, _, rest = example.partition(": ")[0].rpartition(":")
        return (path, int(rest)) if rest.isdigit() else (example, 0)

    stats.examples = sorted(examples, key=place)[:5]
    return stats.to_dict()


def _drop_repeated_ids(ids: List[str], clusters: Clusters, skip_bad_records: bool) -> List[str]:
    """Kept records must have distinct ids: a later kept record reusing an id is an error (or dropped)."""
    seen: Dict[str, int] = {}
    repeated: List[str] = []
    for position in np.flatnonzero(clusters.kind == KEPT).tolist():
        rid = ids[position]
        first = seen.setdefault(rid, position)
        if first == position:
            continue
        if not skip_bad_records:
            raise BadRecordError(
                f"id {rid!r} is used by input records #{first + 1} and #{position + 1} (counting "
                "non-blank lines in input order), whose texts differ; ids must be unique: fix "
                "them, or pass --skip-bad-records to drop the later record"
            )
        clusters.kind[position], clusters.keeper[position] = DUPLICATE_ID, first
        repeated.append(rid)
    return repeated


def _listing(ids: List[str], clusters: Clusters, which: int, limit: int) -> Dict[str, Any]:
    """Counts and the first ``limit`` clusters (by keeper position) of one removal kind."""
    removed = np.flatnonzero(clusters.kind == which)
    keepers = clusters.keeper[removed]
    order = np.argsort(keepers, kind="stable")
    removed, keepers = removed[order], keepers[order]
    starts = np.flatnonzero(np.concatenate([[True], keepers[1:] != keepers[:-1]])) if len(removed) else removed
    listed = []
    for k, start in enumerate(starts[:limit].tolist()):
        end = int(starts[k + 1]) if k + 1 < len(starts) else len(removed)
        members = removed[start:end]
        entry: Dict[str, Any] = {"keeper": ids[int(keepers[start])], "num_removed": int(len(members))}
        shown = members[:_MAX_LISTED_PER_CLUSTER].tolist()
        if which == NEAR:
            entry["removed"] = [{"id": ids[p], "similarity": round(float(clusters.similarity[p]), 4)} for p in shown]
        else:
            entry["removed"] = [ids[p] for p in shown]
        listed.append(entry)
    return {"removed": int(len(removed)), "clusters": int(len(starts)), "listed": listed}


def build_report(
    ids: List[str],
    clusters: Clusters,
    settings: Dict[str, Any],
    bad_records: Dict[str, Any],
    repeated_ids: List[str],
    limit: int,
) -> Dict[str, Any]:
    """The JSON report of a finalise (identical for any number of shards)."""
    kept = int(np.count_nonzero(clusters.kind == KEPT))
    near = _listing(ids, clusters, NEAR, limit)
    near.update(candidate_pairs=clusters.candidate_pairs, linked_pairs=clusters.linked_pairs)
    return {
        "stage": "dedup",
        "settings": settings,
        "input_records": len(ids),
        "kept_records": kept,
        "removed_records": len(ids) - kept,
        "exact_duplicates": _listing(ids, clusters, EXACT, limit),
        "near_duplicates": near,
        "bad_records": bad_records,
        "duplicate_ids": {"removed": len(repeated_ids), "ids": repeated_ids[:limit]},
        "report_limit": limit,
        "max_listed_per_cluster": _MAX_LISTED_PER_CLUSTER,
    }


def _write_parts(
    inputs: Sequence[str],
    output: str,
    num_shards: int,
    shards: SignatureShards,
    kept_rows: np.ndarray,
    settings: Dict[str, Any],
    skip_bad_records: bool,
    progress: bool,
) -> None:
    """Write the kept records of each input shard to its output part (resumable, exactly once)."""
    meter = ProgressMeter("dedup: writing", total=len(kept_rows), unit="docs", enabled=progress)
    for index in range(num_shards):
        begin, end = int(shards.shard_starts[index]), int(shards.shard_starts[index + 1])
        with ShardOutput(output, "dedup", index, num_shards, settings) as out:
            if out.already_finished:
                meter.update(docs=end - begin)
                continue
            stage = StageInput(inputs, index, num_shards, skip_bad_records, duplicate_ids="keep")
            row = begin
            for record in stage:
                if row >= end or record["id"] != shards.ids[row]:
                    raise DataFormatError(
                        f"the input changed after it was sketched (shard {index}, record "
                        f"{record['id']!r}); delete {_signatures_root(output)} and the output "
                        "parts, and rerun"
                    )
                if kept_rows[row] and not out.is_done(record["id"]):
                    out.write(record)
                row += 1
                meter.update(docs=1)
            if row != end:
                raise DataFormatError(
                    f"the input changed after it was sketched (shard {index} has {row - begin} "
                    f"records, {end - begin} were sketched); delete {_signatures_root(output)} "
                    "and the output parts, and rerun"
                )
            out.finish({"input_records": end - begin, "kept_records": int(np.count_nonzero(kept_rows[begin:end]))})
    meter.close()


def finalize(
    inputs: Sequence[str],
    output: str,
    num_shards: int = 1,
    config: DedupConfig = DedupConfig(),
    skip_bad_records: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Cluster all shards' sketches, write OUTPUT/dedup_report.json and the output parts; returns the report."""
    check_shard_flags(0, num_shards)
    files = StageInput(inputs, 0, num_shards, skip_bad_records, duplicate_ids="keep").files
    settings = config.sketch_settings(files)
    bands, _ = config.band_layout()
    shards = load_signature_shards(_signatures_root(output), num_shards, settings, config.num_perm, bands)
    order = np.argsort(shards.ordinals, kind="stable")  # position (input order) -> row
    if len(order) > 1 and np.any(shards.ordinals[order][1:] == shards.ordinals[order][:-1]):
        raise DataFormatError(
            f"{_signatures_root(output)}: two shards hold the same input record; delete it and rerun the shards"
        )
    clusters = cluster_duplicates(
        shards.exact[order],
        shards.bands[order],
        lambda positions: shards.signature_rows(order[positions]),
        config.threshold,
    )
    ids = [shards.ids[row] for row in order.tolist()]
    repeated = _drop_repeated_ids(ids, clusters, skip_bad_records)
    report = build_report(
        ids,
        clusters,
        {**settings, "threshold": config.threshold},
        _merged_bad_records(shards.metas),
        repeated,
        config.report_limit,
    )
    write_json_atomic(Path(output) / "dedup_report.json", report)
    kept_rows = np.zeros(len(order), dtype=bool)
    kept_rows[order] = clusters.kind == KEPT
    _write_parts(
        inputs, output, num_shards, shards, kept_rows, config.output_settings(files), skip_bad_records, progress
    )
    return report


def run_dedup(
    inputs: Sequence[str],
    output: str,
    config: DedupConfig = DedupConfig(),
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
    finalize_only: bool = False,
    skip_bad_records: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """The whole stage as the command line runs it: sketch one shard, finalise, or (no shard flags) both.

    Returns the report (finalise, plain run) or the shard's sketch meta (--shard-index).
    """
    if shard_index is not None:
        if num_shards is None:
            raise ConfigError("--shard-index needs --num-shards")
        if finalize_only:
            raise ConfigError("--finalize clusters all shards: pass --num-shards n without --shard-index")
        check_shard_flags(shard_index, num_shards)
        return sketch_shard(inputs, output, shard_index, num_shards, config, skip_bad_records, progress)
    if num_shards is None and not finalize_only:
        sketch_shard(inputs, output, 0, 1, config, skip_bad_records, progress)
    return finalize(inputs, output, 1 if num_shards is None else num_shards, config, skip_bad_records, progress)


# ---- command line ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `megalign align dedup`."""
    from megalign.align.cli import add_io_arguments

    add_io_arguments(parser, sharded=False)
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.8,
        help="estimated Jaccard similarity at or above which two documents are near-duplicates (default 0.8)",
    )
    parser.add_argument("--ngram", type=int, default=5, help="character n-gram (shingle) length (default 5)")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash hash functions (default 128)")
    parser.add_argument(
        "--bands",
        type=int,
        default=None,
        help="LSH bands (rows = num_perm // bands; default: the optimum for --threshold)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the hash functions (default 1)")
    parser.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="sketch only this input shard (needs --num-shards); finalise afterwards",
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="number of input shards; without --shard-index: finalise (cluster all shards)",
    )
    parser.add_argument(
        "--finalize", action="store_true", help="cluster the sketches of all --num-shards shards and write the output"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="documents sketched per batch (default 256)")
    parser.add_argument(
        "--report-limit",
        type=int,
        default=1000,
        help="clusters listed per kind in dedup_report.json (default 1000; totals are always given)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `megalign align dedup`."""
    config = DedupConfig(
        threshold=args.threshold,
        ngram=args.ngram,
        num_perm=args.num_perm,
        bands=args.bands,
        seed=args.seed,
        batch_size=args.batch_size,
        report_limit=args.report_limit,
    )
    result = run_dedup(
        args.input, args.output, config, args.shard_index, args.num_shards, args.finalize, args.skip_bad_records
    )
    if args.shard_index is not None:
        print(
            f"dedup: shard {args.shard_index} of {args.num_shards}: sketched {result['records']} records into "
            f"{_signatures_root(args.output)}; when every shard is done, run the same command with "
            f"--num-shards {args.num_shards} --finalize and without --shard-index"
        )
        return 0
    exact, near = result["exact_duplicates"], result["near_duplicates"]
    print(
        f"dedup: {result['input_records']} records, kept {result['kept_records']}, removed {exact['removed']} "
        f"exact ({exact['clusters']} clusters) and {near['removed']} near duplicates ({near['clusters']} clusters)"
        + (
            f" and {result['duplicate_ids']['removed']} records reusing an id"
            if result["duplicate_ids"]["removed"]
            else ""
        )
        + f"; report: {Path(args.output) / REPORT_FILE}"
    )
    if result["bad_records"]["total"]:
        print(f"dedup: skipped {result['bad_records']['total']} bad records", file=sys.stderr)
    return 0
