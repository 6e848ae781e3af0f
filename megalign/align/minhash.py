"""MinHash signatures of character n-gram sets and LSH banding, vectorised with numpy over batches of documents.

A document's shingles are its overlapping character n-grams (a document shorter than n is one shingle:
itself, padded). Each shingle gets a 32-bit hash: a polynomial of its code points modulo 2**64 followed
by the murmur3 64-bit finaliser, top 32 bits, so shingle hashes are uniformly spread. The ``num_perm``
hash functions applied to them are ``h_i(x) = (a_i * x + b_i) mod 2**32`` with random odd ``a_i``:
bijections of the 32-bit values, computed in uint32 (no ``mod p`` as in the textbook ``(a x + b) mod p``
family, half the memory traffic of 64-bit arithmetic); on hashed keys their estimates are as accurate as
ideal permutations (tests/align/test_minhash.py checks error against the binomial standard deviation).
The signature is the minimum of each ``h_i`` over the document's shingles. Everything is seeded (numpy's PCG64), so
signatures are identical across processes, machines and runs (Python's salted ``hash`` is never used).

The estimated Jaccard similarity of two documents is the fraction of equal signature entries. LSH splits
the first ``bands * rows`` entries into ``bands`` bands of ``rows`` rows and hashes each band to 64 bits;
documents that share a band hash in any band are candidate pairs. :func:`optimal_bands` chooses
``(bands, rows)`` for a threshold the way datasketch's MinHashLSH does (equal weights on the false
positive and false negative areas under the S-curve).

    hasher = MinHasher(num_perm=128, ngram=5, seed=1)
    sigs = hasher.signatures(["some normalised text", ...])          # (N, 128) uint32
    bands = band_hashes(sigs, *optimal_bands(0.8, 128))              # (N, B) uint64
    pairs = candidate_pairs(bands)                                   # (M, 2) int64, i < j
    keep = estimate_jaccard(sigs[pairs[:, 0]], sigs[pairs[:, 1]]) >= 0.8
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from megalign.errors import ConfigError

__all__ = ["MinHasher", "band_hashes", "candidate_pairs", "estimate_jaccard", "fmix64", "optimal_bands"]

_U64 = np.uint64
_FMIX_C1 = _U64(0xFF51AFD7ED558CCD)
_FMIX_C2 = _U64(0xC4CEB9FE1A85EC53)
_PAD = np.uint32(0xFFFFFFFF)  # pads documents shorter than n; never a Unicode code point
_CHUNK_SHINGLES = 2048  # shingles per (block, num_perm) uint32 block: the block stays in the CPU cache


def fmix64(values: np.ndarray) -> np.ndarray:
    """The murmur3 64-bit finaliser applied element-wise to a uint64 array (returns a new array)."""
    h = np.asarray(values, dtype=_U64).copy()
    h ^= h >> _U64(33)
    h *= _FMIX_C1
    h ^= h >> _U64(33)
    h *= _FMIX_C2
    h ^= h >> _U64(33)
    return h


class MinHasher:
    """MinHash signatures of the character ``ngram`` sets of texts, ``num_perm`` 32-bit values per text."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 2:
            raise ConfigError(f"--num-perm {num_perm!r} must be an integer >= 2")
        if isinstance(ngram, bool) or not isinstance(ngram, int) or not 1 <= ngram <= 64:
            raise ConfigError(f"--ngram {ngram!r} must be an integer in [1, 64]")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        rng = np.random.default_rng([seed, 0x6D696E68])  # "minh"
        self._poly = rng.integers(1, 2**63, dtype=np.uint64) | _U64(1)  # odd polynomial base of the shingle hash
        self._a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32) | np.uint32(1)  # odd multipliers
        self._b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)

    # ---- shingles ------------------------------------------------------------------------------------------
    def shingle_hashes(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """The uint32 hashes of all shingles of ``texts`` back to back, and each text's start offset.

        Text ``k``'s shingles are ``hashes[offsets[k]:offsets[k + 1]]`` (``offsets`` has ``len(texts) + 1``
        entries); every text has at least one shingle.
        """
        n = self.ngram
        pieces: List[np.ndarray] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for k, text in enumerate(texts):
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            if len(codes) < n:
                codes = np.concatenate([codes, np.full(n - len(codes), _PAD, dtype=np.uint32)])
            pieces.append(codes)
            lengths[k] = len(codes)
        if not pieces:
            return np.empty(0, dtype=np.uint32), np.zeros(1, dtype=np.int64)
        codes = np.concatenate(pieces).astype(np.uint64)
        windows = len(codes) - n + 1  # every window start; those crossing a text boundary are dropped below
        h = codes[:windows].copy()
        for j in range(1, n):
            h *= self._poly
            h += codes[j : j + windows]
        counts = lengths - n + 1
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        valid = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], counts)
        return (fmix64(h[valid]) >> _U64(32)).astype(np.uint32), offsets

    # ---- signatures ----------------------------------------------------------------------------------------
    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """The (len(texts), num_perm) uint32 MinHash signatures of ``texts`` (one numpy pipeline per batch)."""
        hashes, offsets = self.shingle_hashes(texts)
        return self.signatures_from_hashes(hashes, offsets)

    def signatures_from_hashes(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Signatures from :meth:`shingle_hashes` output (uint32 shingle hashes, text start offsets).

        The shingles are processed in cache-sized blocks of ``(block, num_perm)`` hash values; each text's
        minimum is taken over its slice of a block (texts may span blocks).
        """
        num_texts = len(offsets) - 1
        out = np.full((num_texts, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        total = int(offsets[-1]) if num_texts else 0
        block = np.empty((_CHUNK_SHINGLES, self.num_perm), dtype=np.uint32)
        bounds = offsets.tolist()
        text = 0
        for begin in range(0, total, _CHUNK_SHINGLES):
            end = min(begin + _CHUNK_SHINGLES, total)
            view = block[: end - begin]
            np.multiply(hashes[begin:end, None], self._a[None, :], out=view)
            view += self._b
            while text < num_texts and bounds[text] < end:
                first, last = max(bounds[text], begin) - begin, min(bounds[text + 1], end) - begin
                np.minimum(out[text], view[first:last].min(axis=0), out=out[text])
                if bounds[text + 1] > end:
                    break  # the text goes on in the next block
                text += 1
        return out


def estimate_jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signature rows: the fraction of equal entries (row-wise for 2-D input)."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape:
        raise ValueError(f"signature shapes differ: {first.shape} and {second.shape}")
    return np.mean(first == second, axis=-1)


# ---- LSH ---------------------------------------------------------------------------------------------------
def _integrate(values: np.ndarray, grid: np.ndarray) -> float:
    return float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2.0)


def optimal_bands(
    threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5
) -> Tuple[int, int]:
    """The (bands, rows), ``bands * rows <= num_perm``, minimising the weighted false positive and false
    negative areas of the LSH S-curve ``1 - (1 - s**rows)**bands`` around ``threshold`` (datasketch's rule)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold!r} must be in (0, 1]")
    below = np.linspace(0.0, threshold, 2001)
    above = np.linspace(threshold, 1.0, 2001)
    best, best_error = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = _integrate(1.0 - (1.0 - below**rows) ** bands, below)
            false_negative = _integrate((1.0 - above**rows) ** bands, above)
            error = false_positive * false_positive_weight + false_negative * false_negative_weight
            if error < best_error - 1e-12:
                best, best_error = (bands, rows), error
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int, seed: int = 1) -> np.ndarray:
    """(N, bands) uint64: a seeded 64-bit hash of each band of ``rows`` signature entries (band index mixed in)."""
    signatures = np.asarray(signatures)
    if signatures.ndim != 2 or bands < 1 or rows < 1 or bands * rows > signatures.shape[1]:
        raise ConfigError(f"{bands} bands of {rows} rows do not fit signatures of shape {signatures.shape}")
    grid = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    rng = np.random.default_rng([seed, 0x6C7368])  # "lsh"
    h = np.broadcast_to(rng.integers(0, 2**63, size=bands, dtype=np.uint64), (len(signatures), bands)).copy()
    for j in range(rows):
        h = fmix64((h ^ grid[:, :, j]) + _U64(0x9E3779B97F4A7C15))
    return h


def candidate_pairs(bands: np.ndarray, window: int = 64) -> np.ndarray:
    """(M, 2) int64 distinct pairs ``(i, j)``, ``i < j``, of rows sharing a band hash in some band.

    Within one bucket (rows with equal hash in one band, in row order) each row is paired with the
    ``window`` rows before it, so a bucket of k rows costs at most ``k * window`` pairs instead of k**2/2;
    a cluster of many near-identical rows is still linked up through the chains.
    """
    bands = np.asarray(bands, dtype=np.uint64)
    num_rows, num_bands = bands.shape
    if num_rows < 2:
        return np.empty((0, 2), dtype=np.int64)
    # key = (band, hash): sort each band's column separately, rows ascending within equal hashes (stable)
    found: List[np.ndarray] = []
    for band in range(num_bands):
        column = bands[:, band]
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            continue
        shared = np.concatenate([same, [False]]) | np.concatenate([[False], same])  # in a bucket of >= 2
        members = order[shared]
        new_group = ~np.concatenate([[False], same])[shared]
        positions = np.arange(len(members))
        rank = positions - np.maximum.accumulate(np.where(new_group, positions, 0))  # position in the bucket
        for distance in range(1, window + 1):
            at = np.flatnonzero(rank[distance:] >= distance) + distance
            if len(at) == 0:
                break
            found.append(np.stack([members[at - distance], members[at]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    pairs.sort(axis=1)
    codes = np.unique(pairs[:, 0] * num_rows + pairs[:, 1])
    return np.stack([codes // num_rows, codes % num_rows], axis=1)
