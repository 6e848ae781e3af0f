"""Benchmark: `megalign align dedup`'s MinHash-LSH vs datasketch's MinHashLSH, same corpus, same run.

The corpus is real text (megalign/demo/data/sample.jsonl and the shared Arabic corpus when present) plus
planted near-duplicates: copies of random documents mutated by a few character edits, punctuation and
diacritics changes, tatweel, and the drop of one sentence, with the (original, copy) pairs as ground truth.
Both sides do the same work on the same texts: the same key normalisation (normalize_for_match), exact
duplicates by a hash of the key, MinHash over the key's character n-gram sets with the same --num-perm,
LSH with the same (bands, rows), candidates verified by estimated Jaccard >= --threshold, clusters by
union-find, keeper = first in input order. datasketch is used as documented: MinHash.update_batch over the
shingle set, MinHashLSH.query then insert per document. Timed: from the texts to the clusters.

Quality, for both sides: a planted pair whose true Jaccard (of the normalised keys' n-gram sets) is at
least the threshold should end in one cluster (recall); a removed document should have true Jaccard at
least the threshold with its keeper, or be its exact duplicate (precision).

    python benchmarks/dedup.py            # ~6k documents (about 1-2 minutes on 2 cores)
    python benchmarks/dedup.py --quick    # ~600 documents, seconds
    python benchmarks/dedup.py --max-docs 1000 --threshold 0.7 --num-perm 256
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megalign.align.dedup import DedupConfig, Sketcher, cluster_duplicates, dedup_key  # noqa: E402

DEFAULT_INPUTS = [os.path.join(REPO_ROOT, "megalign", "demo", "data", "sample.jsonl"),
                  os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "arabic", "*.jsonl")]
TARGET_RATIO = 2.0
_DIACRITICS = "\u064B\u064C\u064D\u064E\u064F\u0650\u0651\u0652"
_SENTENCE = re.compile(r"(?<=[.!?؟。])\s+")


def load_texts(patterns: Sequence[str], max_docs: int) -> List[str]:
    """Up to ``max_docs`` texts from JSONL files, spread evenly over the files (missing patterns skipped)."""
    per_file: List[List[str]] = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            with open(path, encoding="utf-8") as handle:
                per_file.append([json.loads(line)["text"] for line in handle if line.strip()])
    texts: List[str] = []
    while len(texts) < max_docs and any(per_file):
        for pool in per_file:  # round robin, so short and long documents mix
            if pool and len(texts) < max_docs:
                texts.append(pool.pop(0))
    return texts


def mutate(rng: random.Random, text: str) -> str:
    """A near-duplicate: some of character edits, punctuation, diacritics and tatweel, one sentence dropped."""
    sentences = _SENTENCE.split(text)
    if len(sentences) >= 6 and rng.random() < 0.3:
        del sentences[rng.randrange(len(sentences))]
    chars = list(" ".join(sentences))
    for _ in range(rng.randint(1, max(1, len(chars) // 200))):
        at = rng.randrange(len(chars))
        chars[at] = rng.choice("abcdefghijklmnopqrstuvwxyzابتثجحخدذرزسشصضطظعغفقكلمنهوي")
    for _ in range(rng.randint(0, 6)):
        at = rng.randrange(len(chars) + 1)
        chars.insert(at, rng.choice(_DIACRITICS + "\u0640"))  # removed again by the key normalisation
    if rng.random() < 0.5:
        chars = [("، " if c == "," else c) for c in chars]  # punctuation variants
    return "".join(chars)


def build_corpus(texts: List[str], copies: int, seed: int) -> Tuple[List[str], List[Tuple[int, int]]]:
    """The texts with ``copies`` mutated copies inserted at random places; the planted (original, copy) pairs."""
    rng = random.Random(seed)
    items: List[Tuple[str, int, int]] = [(text, k, -1) for k, text in enumerate(texts)]  # (text, tag, source tag)
    for c in range(copies):
        source = rng.randrange(len(texts))
        items.append((mutate(rng, texts[source]), len(texts) + c, source))
    rng.shuffle(items)
    position = {tag: p for p, (_, tag, _) in enumerate(items)}
    pairs = [(position[source], position[tag]) for _, tag, source in items if source >= 0]
    return [text for text, _, _ in items], pairs


# ---- the two systems: texts -> (keeper label per document) --------------------------------------------------
def run_megalign(texts: List[str], config: DedupConfig) -> np.ndarray:
    """Our stage's core (the functions megalign align dedup calls), in memory; returns each document's keeper."""
    sketcher = Sketcher(config)
    exact, sigs, bands = [], [], []
    for begin in range(0, len(texts), config.batch_size):
        e, s, b = sketcher.sketch(texts[begin:begin + config.batch_size])
        exact.append(e), sigs.append(s), bands.append(b)
    signatures = np.concatenate(sigs)
    clusters = cluster_duplicates(np.concatenate(exact), np.concatenate(bands), lambda p: signatures[p],
                                  config.threshold)
    label = clusters.keeper.copy()
    label = label[label]  # an exact duplicate of a near-duplicate ends with the near keeper
    return label


def run_datasketch(texts: List[str], config: DedupConfig) -> np.ndarray:
    """The same pipeline with datasketch.MinHash and MinHashLSH; returns each document's keeper."""
    from datasketch import MinHash, MinHashLSH

    bands, rows = config.band_layout()
    n = config.ngram
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, params=(bands, rows))
    parent = list(range(len(texts)))
    first_of_key: Dict[bytes, int] = {}
    sketches: Dict[int, MinHash] = {}

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for index, text in enumerate(texts):
        key = dedup_key(text)
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        if digest in first_of_key:
            parent[index] = first_of_key[digest]
            continue
        first_of_key[digest] = index
        sketch = MinHash(num_perm=config.num_perm, seed=config.seed)
        sketch.update_batch([s.encode("utf-8") for s in {key[j:j + n] for j in range(max(len(key) - n + 1, 1))}])
        for other in lsh.query(sketch):
            if sketch.jaccard(sketches[other]) >= config.threshold:
                a, b = find(other), find(index)
                parent[max(a, b)] = min(a, b)
        lsh.insert(index, sketch)
        sketches[index] = sketch
    return np.asarray([find(k) for k in range(len(texts))], dtype=np.int64)


# ---- quality -----------------------------------------------------------------------------------------------
def true_jaccard(a: str, b: str, n: int) -> float:
    """Exact Jaccard similarity of the n-gram sets of two documents' keys."""
    x, y = (dedup_key(t) for t in (a, b))
    sx = {x[j:j + n] for j in range(max(len(x) - n + 1, 1))}
    sy = {y[j:j + n] for j in range(max(len(y) - n + 1, 1))}
    return len(sx & sy) / len(sx | sy)


def quality(label: np.ndarray, texts: List[str], positives: List[Tuple[int, int]], n: int, threshold: float,
            cache: Dict[Tuple[int, int], float]) -> Tuple[float, float, int]:
    """(recall on planted pairs at/above the threshold, precision of removed->keeper pairs, documents removed)."""
    found = sum(1 for a, b in positives if label[a] == label[b])
    removed = np.flatnonzero(label != np.arange(len(label)))
    correct = 0
    for doc in removed.tolist():
        pair = (int(label[doc]), doc)
        if pair not in cache:
            cache[pair] = true_jaccard(texts[pair[0]], texts[pair[1]], n)
        correct += cache[pair] >= threshold
    return found / max(len(positives), 1), correct / max(len(removed), 1), len(removed)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=DEFAULT_INPUTS, help="JSONL files or globs")
    parser.add_argument("--max-docs", type=int, default=5000, help="real documents to take (default 5000)")
    parser.add_argument("--copies", type=float, default=0.2, help="planted copies per real document (default 0.2)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="500 real documents")
    args = parser.parse_args(argv)
    max_docs = 500 if args.quick else args.max_docs
    texts = load_texts(args.input, max_docs)
    if not texts:
        print(f"no input documents found in {args.input}", file=sys.stderr)
        return 1
    corpus, planted = build_corpus(texts, int(len(texts) * args.copies), args.seed)
    config = DedupConfig(threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm, seed=args.seed)
    bands, rows = config.band_layout()
    chars = sum(len(t) for t in corpus)
    print(f"corpus: {len(corpus)} documents ({len(texts)} real + {len(planted)} planted copies), "
          f"{chars / 1e6:.2f}M characters; threshold {args.threshold}, {args.ngram}-grams, num_perm "
          f"{args.num_perm}, LSH {bands} bands x {rows} rows (both sides)")
    cache: Dict[Tuple[int, int], float] = {}
    truth = {pair: true_jaccard(corpus[pair[0]], corpus[pair[1]], args.ngram) for pair in planted}
    positives = [pair for pair, value in truth.items() if value >= args.threshold]
    print(f"planted pairs: {len(planted)}, of which {len(positives)} have true Jaccard >= {args.threshold} "
          "(the recall ground truth)")

    results = {}
    for name, system in (("megalign", run_megalign), ("datasketch", run_datasketch)):
        started = time.perf_counter()
        label = system(corpus, config)
        seconds = time.perf_counter() - started
        recall, precision, removed = quality(label, corpus, positives, args.ngram, args.threshold, cache)
        results[name] = (len(corpus) / seconds, recall, precision)
        print(f"{name:>10}: {len(corpus) / seconds:9.1f} docs/s ({chars / seconds / 1e6:.2f}M chars/s, "
              f"{seconds:.2f}s) | recall {recall:.4f} | precision {precision:.4f} | removed {removed}")
    ratio = results["megalign"][0] / results["datasketch"][0]
    recall_gap = results["megalign"][1] - results["datasketch"][1]
    met = ratio >= TARGET_RATIO and recall_gap >= -0.01
    print(f"speed ratio megalign/datasketch: {ratio:.2f}x; recall difference {recall_gap:+.4f}")
    print(f"target: >= {TARGET_RATIO:g}x datasketch at equal recall: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
