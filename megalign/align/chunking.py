"""Splitting long documents into pieces that fit the worker's context, at paragraph boundaries.

A document is cut into consecutive pieces, each ``(text, separator)`` where ``separator`` is the
whitespace that followed it in the original, so ``"".join(t + s for t, s in pieces)`` gives the document
back exactly. Pieces are filled greedily with whole paragraphs (split at blank lines) while they stay
within ``max_units`` as measured by ``count`` (tokens of the worker's tokenizer, or characters). A single
paragraph over the limit is cut at line breaks, then after sentence ends (``. ! ? ؟ ۔ …``), then between
words, and only a single word over the limit is cut inside it. The rewrites of the pieces are joined
back with the original separators (:func:`join_rewrites`).
"""

from __future__ import annotations

import re
from typing import Callable, List, Sequence, Tuple

__all__ = ["Piece", "join_rewrites", "split_document"]

Piece = Tuple[str, str]  # (text, the whitespace that followed it)
Counter = Callable[[str], int]

_LEVELS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs (blank lines)
    re.compile(r"\n\s*"),  # lines
    re.compile(r"(?<=[.!?؟۔…])\s+"),  # sentences
    re.compile(r"\s+"),  # words
)


def _split_keeping(text: str, pattern: re.Pattern) -> List[Piece]:
    """``text`` cut at every match of ``pattern``, each part with the matched separator after it."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            pieces.append((text[start : match.start()], match.group()))
        elif pieces:  # a separator right after another: glue it on
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + match.group())
        start = match.end()
    if start < len(text):
        pieces.append((text[start:], ""))
    return pieces


def _hard_cut(text: str, max_units: int, count: Counter) -> List[Piece]:
    """Cut one unbreakable word into the longest prefixes that fit (binary search on the length)."""
    pieces = []
    while text:
        low, high = 1, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            if count(text[:middle]) <= max_units:
                low = middle
            else:
                high = middle - 1
        pieces.append((text[:low], ""))
        text = text[low:]
    return pieces


def _pack(parts: Sequence[Piece], max_units: int, count: Counter, level: int) -> List[Piece]:
    """Greedily join consecutive parts into pieces within ``max_units``; split parts that alone exceed it."""
    out: List[Piece] = []
    current, current_sep = "", ""
    for text, separator in parts:
        if count(text) > max_units:
            if current:
                out.append((current, current_sep))
                current, current_sep = "", ""
            sub = []
            for deeper in range(level + 1, len(_LEVELS)):  # the coarsest boundary that splits it
                smaller = _split_keeping(text, _LEVELS[deeper])
                if len(smaller) > 1:
                    sub = _pack(smaller, max_units, count, deeper)
                    break
            if not sub:
                sub = _hard_cut(text, max_units, count)
            sub[-1] = (sub[-1][0], sub[-1][1] + separator)
            out.extend(sub)
            continue
        candidate = current + current_sep + text if current else text
        if current and count(candidate) > max_units:
            out.append((current, current_sep))
            current, current_sep = text, separator
        else:
            current, current_sep = candidate, separator
    if current:
        out.append((current, current_sep))
    return out


def split_document(text: str, max_units: int, count: Counter = len) -> List[Piece]:
    """``text`` as pieces of at most ``max_units`` (see the module docstring); leading whitespace is kept
    as a first piece's prefix. Raises ValueError for ``max_units < 1``."""
    if max_units < 1:
        raise ValueError(f"max_units must be >= 1, got {max_units}")
    stripped = text.lstrip()
    lead = text[: len(text) - len(stripped)]
    if not stripped:
        return [("", text)] if text else []
    pieces = _pack(_split_keeping(stripped, _LEVELS[0]), max_units, count, 0)
    if lead:
        pieces.insert(0, ("", lead))
    return [piece for piece in pieces if piece[0] or piece[1]]


def join_rewrites(pieces: Sequence[Piece], rewrites: Sequence[str]) -> str:
    """The rewritten document: each piece's rewrite (stripped) followed by the piece's original separator."""
    if len(pieces) != len(rewrites):
        raise ValueError(f"{len(rewrites)} rewrites for {len(pieces)} pieces")
    return "".join(
        (rewrite.strip() if text else "") + separator for (text, separator), rewrite in zip(pieces, rewrites)
    ).strip()
