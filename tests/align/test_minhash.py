"""MinHash signatures and LSH banding (megalign.align.minhash): accuracy, determinism, batching, candidates."""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import numpy as np
import pytest

from megalign.align.minhash import MinHasher, band_hashes, candidate_pairs, estimate_jaccard, optimal_bands
from megalign.errors import ConfigError

WORDS = ["كتاب", "مدرسة", "سماء", "بحر", "قلم", "شمس", "مدينة", "طريق", "نهر", "جبل", "alpha", "delta", "orbit",
         "river", "stone", "cloud", "طالب", "معلم", "بيت", "شجرة"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))


def _shingles(text: str, n: int = 5) -> set:
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def test_signature_estimates_track_true_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=256, ngram=5, seed=3)
    firsts, seconds = [], []
    for k in range(40):
        base = _text(rng, 120)
        words = base.split()
        keep = 1.0 - k / 45.0  # similarities from ~1 down to ~0.1
        mutated = " ".join(w if rng.random() < keep else _text(rng, 1) for w in words)
        firsts.append(base)
        seconds.append(mutated)
    sigs_a, sigs_b = hasher.signatures(firsts), hasher.signatures(seconds)
    estimates = estimate_jaccard(sigs_a, sigs_b)
    truth = np.array([_jaccard(a, b) for a, b in zip(firsts, seconds)])
    assert truth.min() < 0.3 and truth.max() > 0.9
    errors = estimates - truth
    assert np.max(np.abs(errors)) < 0.12  # ~4 standard deviations at 256 permutations
    assert abs(np.mean(errors)) < 0.03  # no bias
    inside = (truth > 0.05) & (truth < 0.95)
    z = errors[inside] / np.sqrt(truth[inside] * (1 - truth[inside]) / 256)
    assert np.std(z) < 1.4  # as accurate as ideal random permutations (binomial error, z std ~1)
    assert estimate_jaccard(sigs_a[0], sigs_a[0]) == 1.0


def test_batching_short_texts_and_chunk_boundaries_do_not_change_signatures():
    rng = random.Random(1)
    texts = ["", "abc", "abcd", "abcde", _text(rng, 400), "x" * 3000, _text(rng, 30)] + [_text(rng, 5) for _ in range(50)]
    hasher = MinHasher(num_perm=64, ngram=5, seed=1)
    together = hasher.signatures(texts)
    one_by_one = np.concatenate([hasher.signatures([t]) for t in texts])
    assert together.dtype == np.uint32 and together.shape == (len(texts), 64)
    np.testing.assert_array_equal(together, one_by_one)
    hashes, offsets = hasher.shingle_hashes(["", "ab", "abcdefg"])
    assert offsets.tolist() == [0, 1, 2, 5]  # short texts are one shingle, long ones len - n + 1
    assert not np.array_equal(together[1], together[2])  # "abc" and "abcd" differ
    assert hasher.signatures([]).shape == (0, 64)
    # a single shingle repeated has the same signature however often it repeats (sets, not multisets)
    np.testing.assert_array_equal(hasher.signatures(["aaaaa"]), hasher.signatures(["a" * 50]))


_SUBPROCESS = """
import hashlib, sys
from megalign.align.minhash import MinHasher, band_hashes
texts = ["النص الأول للاختبار " * 5, "second text for the test " * 7, "ab"]
sigs = MinHasher(num_perm=32, ngram=4, seed=9).signatures(texts)
print(hashlib.sha256(sigs.tobytes() + band_hashes(sigs, 8, 4, 9).tobytes()).hexdigest())
"""


def test_signatures_are_identical_in_another_process():
    texts = ["النص الأول للاختبار " * 5, "second text for the test " * 7, "ab"]
    sigs = MinHasher(num_perm=32, ngram=4, seed=9).signatures(texts)
    here = hashlib.sha256(sigs.tobytes() + band_hashes(sigs, 8, 4, 9).tobytes()).hexdigest()
    there = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert there == here
    other_seed = MinHasher(num_perm=32, ngram=4, seed=10).signatures(texts)
    assert not np.array_equal(other_seed, sigs)


def test_optimal_bands_match_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, num_perm in ((0.5, 64), (0.8, 128), (0.9, 128), (0.7, 256)):
        assert optimal_bands(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)
    with pytest.raises(ConfigError, match="--threshold"):
        optimal_bands(1.5, 128)


def test_band_hashes_and_candidate_pairs():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(6, 12), dtype=np.uint32)
    sigs[3, :4] = sigs[0, :4]  # rows 0 and 3 share band 0
    sigs[5, 8:] = sigs[1, 8:]  # rows 1 and 5 share band 2
    sigs[4, 4:8] = sigs[2, :4]  # equal values in different bands are not a match
    bands = band_hashes(sigs, 3, 4, seed=1)
    assert bands.shape == (6, 3) and bands.dtype == np.uint64
    assert candidate_pairs(bands).tolist() == [[0, 3], [1, 5]]
    with pytest.raises(ConfigError, match="do not fit"):
        band_hashes(sigs, 4, 4)
    assert candidate_pairs(bands[:1]).shape == (0, 2)


def test_candidate_pairs_window_bounds_big_buckets_but_keeps_them_connected():
    bands = np.zeros((200, 2), dtype=np.uint64)  # one bucket of 200 in both bands
    bands[:, 1] = np.arange(200)  # band 1: all distinct
    pairs = candidate_pairs(bands, window=3)
    assert len(pairs) == 199 + 198 + 197
    assert set(map(tuple, pairs.tolist())) >= {(k, k + 1) for k in range(199)}  # a chain through the bucket
    assert (pairs[:, 0] < pairs[:, 1]).all()


def test_bad_parameters():
    with pytest.raises(ConfigError, match="--num-perm"):
        MinHasher(num_perm=1)
    with pytest.raises(ConfigError, match="--ngram"):
        MinHasher(ngram=0)
