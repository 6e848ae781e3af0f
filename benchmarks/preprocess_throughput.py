"""Benchmark: `megalign preprocess` vs Megatron-LM's tools/preprocess_data.py pipeline, same run.

Both sides tokenize the same JSONL files with the same tokenizer, the same number of worker
processes and the same CPUs (the benchmark pins itself to the first --workers CPUs), and write
Megatron .bin/.idx files with --append-eod. The baseline reimplements Megatron-LM's
tools/preprocess_data.py faithfully: the main process reads lines and feeds them to
multiprocessing.Pool.imap(encode, lines, 32); each worker (one tokenizer per worker, built in the
Pool initializer) runs json.loads and encodes one document; the main process writes the results
with megatron-core's IndexedDatasetBuilder (add_document(ids, lengths), finalize). The baseline's
per-document encode is megalign's Tokenizer.encode, i.e. the bare tokenizer library call (Megatron
wraps it in more Python: transformers' AutoTokenizer for HF tokenizers), so the ratio is a lower
bound. Both outputs must hold the same tokens; the script prints MB/s (JSONL bytes) and the ratio.

The tokenizer (vocab ~32k) is trained once on the input with megalign's trainer and cached under
benchmarks/_work/.

    python benchmarks/preprocess_throughput.py                          # the shared Arabic corpus, both tokenizers
    python benchmarks/preprocess_throughput.py --tokenizer hf-bpe --workers 4 --repeats 3
    python benchmarks/preprocess_throughput.py --input 'data/*.jsonl' --tokenizer sentencepiece
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megalign.data.indexed_dataset import best_token_dtype  # noqa: E402
from megalign.data.preprocess import preprocess  # noqa: E402
from megalign.data.tokenizer_training import train_tokenizer  # noqa: E402
from megalign.data.tokenizers import Tokenizer, build_tokenizer  # noqa: E402

WORK_ROOT = os.path.join(REPO_ROOT, "benchmarks", "_work", "preprocess")
DEFAULT_INPUT = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "arabic", "*.jsonl")
TOKENIZER_TYPE = {"hf-bpe": "HuggingFaceTokenizer", "sentencepiece": "GPTSentencePieceTokenizer"}
TARGET_RATIO = 3.0


# --------------------------------------------------------------------------------------------------
# Baseline: Megatron-LM tools/preprocess_data.py (no --split-sentences, --append-eod, one partition)
# --------------------------------------------------------------------------------------------------
class MegatronEncoder:
    """Megatron's Encoder: a class-level tokenizer set by the Pool initializer, encode() per JSON line."""

    tokenizer: Optional[Tokenizer] = None

    def __init__(self, tokenizer_type: str, tokenizer_model: str, json_keys: List[str], append_eod: bool) -> None:
        self.tokenizer_type = tokenizer_type
        self.tokenizer_model = tokenizer_model
        self.json_keys = json_keys
        self.append_eod = append_eod

    def initializer(self) -> None:
        MegatronEncoder.tokenizer = build_tokenizer(self.tokenizer_type, self.tokenizer_model)

    def encode(self, json_line: str) -> Tuple[Dict[str, List[int]], Dict[str, List[int]], int]:
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in self.json_keys:
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids: List[int] = []
            sentence_lens: List[int] = []
            for sentence in sentences:
                sentence_ids = MegatronEncoder.tokenizer.encode(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(MegatronEncoder.tokenizer.eod)
                sentence_lens[-1] += 1
            ids[key] = doc_ids
            lens[key] = sentence_lens
        return ids, lens, len(json_line)


def run_baseline(paths: List[str], prefix: str, tokenizer_type: str, tokenizer_model: str, workers: int) -> None:
    """Megatron's process_json_file, over the files in order, into one dataset per key."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    vocab_size = build_tokenizer(tokenizer_type, tokenizer_model).vocab_size
    encoder = MegatronEncoder(tokenizer_type, tokenizer_model, ["text"], append_eod=True)
    builder = IndexedDatasetBuilder(prefix + "_text_document.bin", dtype=best_token_dtype(vocab_size).type)
    pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
    try:
        for path in paths:
            with open(path, "r", encoding="utf-8") as fin:
                for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
                    for key in doc.keys():
                        builder.add_document(doc[key], sentence_lens[key])
    finally:
        pool.close()
        pool.join()
    builder.finalize(prefix + "_text_document.idx")


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------
def cached_tokenizer(kind: str, paths: List[str], vocab_size: int) -> str:
    """Train (once) a tokenizer of `kind` on `paths`; the cache key is the kind, size and input files."""
    identity = json.dumps([kind, vocab_size] + [[p, os.path.getsize(p)] for p in paths]).encode()
    digest = hashlib.sha256(identity).hexdigest()[:12]
    directory = os.path.join(WORK_ROOT, "tokenizers", f"{kind}-{vocab_size}-{digest}")
    main_file = os.path.join(directory, "tokenizer.json" if kind == "hf-bpe" else "tokenizer.model")
    if not os.path.isfile(main_file):
        print(f"[bench] training a {kind} tokenizer (vocab {vocab_size}) into {directory} ...", flush=True)
        main_file = train_tokenizer(paths, directory, kind=kind, vocab_size=vocab_size)
    return directory if kind == "hf-bpe" else main_file


def read_bytes(prefix: str) -> Tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as data, open(prefix + ".idx", "rb") as index:
        return data.read(), index.read()


def best_time(repeats: int, action) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_tokenizer(kind: str, paths: List[str], args: argparse.Namespace, have_megatron: bool) -> Optional[dict]:
    model = cached_tokenizer(kind, paths, args.vocab_size)
    tokenizer_type = TOKENIZER_TYPE[kind]
    vocab = build_tokenizer(tokenizer_type, model).vocab_size
    megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
    out = os.path.join(WORK_ROOT, "out", kind)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ours_prefix, base_prefix = os.path.join(out, "megalign"), os.path.join(out, "megatron")

    def ours() -> None:
        preprocess(paths, ours_prefix, tokenizer_type, model, append_eod=True, workers=args.workers, progress=False)

    ours_seconds = best_time(args.repeats, ours)
    row = {"tokenizer": f"{kind} ({tokenizer_type}, vocab {vocab})", "megabytes": megabytes,
           "megalign_s": ours_seconds, "megalign_MBps": megabytes / ours_seconds}
    if not have_megatron:
        return row
    row["megatron_s"] = best_time(args.repeats, lambda: run_baseline(paths, base_prefix, tokenizer_type, model,
                                                                      args.workers))
    row["megatron_MBps"] = megabytes / row["megatron_s"]
    row["ratio"] = row["megatron_s"] / ours_seconds
    ours_bin, ours_idx = read_bytes(ours_prefix + "_text_document")
    base_bin, base_idx = read_bytes(base_prefix + "_text_document")
    row["same_tokens"] = ours_bin == base_bin
    row["same_index"] = ours_idx == base_idx
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=[DEFAULT_INPUT], help="JSONL files or globs (plain .jsonl)")
    parser.add_argument("--tokenizer", choices=["hf-bpe", "sentencepiece", "both"], default="both")
    parser.add_argument("--vocab-size", type=int, default=32000)
    available = sorted(os.sched_getaffinity(0))
    parser.add_argument("--workers", type=int, default=len(available), help="worker processes for both sides")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side; the fastest counts")
    args = parser.parse_args()

    paths = sorted({p for pattern in args.input for p in glob.glob(pattern)})
    if not paths:
        print(f"[bench] no input found at {' '.join(args.input)}: the benchmark needs JSONL text (by default "
              f"the shared Arabic corpus at {os.path.dirname(DEFAULT_INPUT)}); pass --input GLOB", file=sys.stderr)
        return 1
    if args.workers < 1 or args.workers > len(available):
        print(f"[bench] --workers must be in 1..{len(available)} (the CPUs this process may use)", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, available[: args.workers])  # both sides get the same CPUs; children inherit this
    try:
        import megatron.core.datasets.indexed_dataset  # noqa: F401

        have_megatron = True
    except ImportError:
        have_megatron = False
        print("[bench] megatron-core is not installed: skipping the baseline (pip install megatron-core==0.16.1)")

    kinds = ["hf-bpe", "sentencepiece"] if args.tokenizer == "both" else [args.tokenizer]
    print(f"[bench] {len(paths)} files, {sum(os.path.getsize(p) for p in paths) / 1e6:.1f} MB; "
          f"workers={args.workers} on CPUs {available[: args.workers]}; best of {args.repeats}")
    failed = False
    for kind in kinds:
        row = bench_tokenizer(kind, paths, args, have_megatron)
        line = f"{row['tokenizer']}: megalign {row['megalign_s']:.2f} s = {row['megalign_MBps']:.2f} MB/s"
        if "ratio" in row:
            line += (f"; megatron pipeline {row['megatron_s']:.2f} s = {row['megatron_MBps']:.2f} MB/s; "
                     f"ratio {row['ratio']:.2f}x (target >= {TARGET_RATIO:.0f}x); same tokens: {row['same_tokens']}, "
                     f"same .idx: {row['same_index']}")
            failed |= not row["same_tokens"]
        print(line, flush=True)
    if failed:
        print("[bench] FAILED: the outputs differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
