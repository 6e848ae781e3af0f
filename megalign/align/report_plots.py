"""PNG figures of the quality report (matplotlib, drawn off-screen): overlaid histograms of the original
and the aligned corpus, e.g. per-document perplexity on a log scale as in the paper's figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from megalign.errors import ConfigError
from megalign.utils.atomic import atomic_write

__all__ = ["histogram_png"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "the report's PNG figures need matplotlib: pip install 'megalign[report]' (or pass --no-plots)"
        ) from None
    return plt


def histogram_png(
    path: Path,
    original: Sequence[float],
    aligned: Sequence[float],
    title: str,
    xlabel: str,
    log_x: bool = False,
    bins: int = 40,
) -> Path:
    """Write overlaid histograms of ``original`` and ``aligned`` values (with their medians) to ``path``."""
    plt = _pyplot()
    values = [v for v in list(original) + list(aligned) if v is not None and math.isfinite(v) and (v > 0 or not log_x)]
    if not values:
        raise ValueError(f"{title}: no values to plot")
    low, high = min(values), max(values)
    if high == low:
        high = low + 1.0
    if log_x:
        edges = [low * (high / low) ** (i / bins) for i in range(bins + 1)]
    else:
        edges = [low + (high - low) * i / bins for i in range(bins + 1)]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for label, data, color in (("original", original, "#d62728"), ("aligned", aligned, "#1f77b4")):
        data = [v for v in data if v is not None and math.isfinite(v)]
        if not data:
            continue
        axes.hist(data, bins=edges, alpha=0.5, color=color, label=f"{label} (n={len(data)})")
        median = sorted(data)[len(data) // 2]
        axes.axvline(median, color=color, linestyle="--", linewidth=1)
    if log_x:
        axes.set_xscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("documents")
    axes.legend()
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)
    return path
