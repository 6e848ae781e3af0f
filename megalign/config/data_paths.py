"""The value formats of Megatron's ``--data-path`` and ``--split`` flags, parsed where the flags are defined.

``--data-path P1 P2 ...`` or ``W1 P1 W2 P2 ...`` becomes a :data:`Blend` (prefixes, weights or None);
``--split 969,30,1`` becomes normalised [train, valid, test] fractions and then the [begin, end)
book-ends of each split. The dataset package (megalign.data) builds datasets from these values.
"""

from __future__ import annotations

import functools
import math
import re
from typing import List, Optional, Sequence, Tuple

import numpy

from megalign.errors import ConfigError

__all__ = ["Blend", "NUM_SPLITS", "SplitMatrix", "parse_data_path", "parse_split", "split_matrix_from_vector"]

Blend = Tuple[List[str], Optional[List[float]]]
SplitMatrix = List[Optional[Tuple[float, float]]]
NUM_SPLITS = 3  # train, valid, test
_NUMBER = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)\s*$")


def parse_data_path(values: Sequence[str]) -> Blend:
    """`--data-path` values -> (prefixes, weights or None).

    An even-length list whose every other entry (from the first) is a number is "weight prefix"
    pairs; anything else is a list of prefixes.
    """
    items = [str(value).strip() for value in values]
    if not items or any(not item for item in items):
        raise ConfigError(
            f"--data-path: needs dataset prefixes (optionally weighted: W1 P1 W2 P2 ...), got {list(values)!r}"
        )
    if len(items) % 2 == 0:
        weights = [_weight(item) for item in items[0::2]]
        if all(weight is not None for weight in weights):
            numbers = [float(weight) for weight in weights if weight is not None]
            for number, prefix in zip(numbers, items[1::2]):
                if not number > 0:
                    raise ConfigError(f"--data-path: weight {number} of {prefix} must be positive")
            return items[1::2], numbers
        if any(weight is not None for weight in weights):
            raise ConfigError(
                f"--data-path: {items!r} mixes weights and prefixes; give either prefixes only or W1 P1 W2 P2 pairs"
            )
    return items, None


def _weight(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_split(split: str) -> List[float]:
    """ "969,30,1" -> normalised [train, valid, test] fractions (missing entries are 0), in float64 as
    megatron-core computes them."""
    if not isinstance(split, str):
        raise ConfigError(f'split: must be a string like "969,30,1", got {split!r}')
    parts = re.split(r"[,/]", split)
    if len(parts) > NUM_SPLITS or any(not _NUMBER.match(part) for part in parts):
        raise ConfigError(
            f'split: "{split}" is not up to three non-negative numbers separated by commas (train,valid,test), '
            'e.g. "969,30,1"'
        )
    vector = [float(part) for part in parts] + [0.0] * (NUM_SPLITS - len(parts))
    if sum(vector) <= 0:
        raise ConfigError(f'split: "{split}" gives every split weight 0')
    values = numpy.array(vector, dtype=numpy.float64)
    return [float(value) for value in values / numpy.sum(values)]


def split_matrix_from_vector(vector: Sequence[float]) -> SplitMatrix:
    """Normalised fractions -> [begin, end) book-ends per split, None for an empty split."""
    edges = functools.reduce(lambda acc, value: acc + [acc[-1] + value], vector, [0.0])
    return [(low, high) if high > low else None for low, high in zip(edges[:-1], edges[1:])]
