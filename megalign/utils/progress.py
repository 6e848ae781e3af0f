"""Progress reporting for long-running commands: periodic log lines with rates and an ETA."""
from __future__ import annotations

import sys
import time
from typing import Dict, Optional, TextIO


def format_duration(seconds: float) -> str:
    """Format seconds as H:MM:SS."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_count(value: float) -> str:
    """Human-readable count: 950, 12.3k, 4.56M, 7.89G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


class ProgressMeter:
    """Counts named quantities and prints a status line at most every `interval` seconds.

    The first counter is the unit of progress (e.g. documents); `total` (of that unit), when known,
    gives a percentage and an ETA. Other counters (tokens, bytes) are shown as rates.

        meter = ProgressMeter("preprocess", total=n_docs, units={"docs": "docs", "bytes": "B"})
        meter.update(docs=100, tokens=52_000, bytes=400_000)
        meter.close()
    """

    def __init__(
        self,
        name: str,
        total: Optional[int] = None,
        unit: str = "items",
        interval: float = 5.0,
        stream: TextIO = sys.stderr,
        enabled: bool = True,
    ) -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = stream
        self.enabled = enabled
        self.counts: Dict[str, float] = {unit: 0}
        self.start = time.monotonic()
        self._last_print = self.start

    def update(self, **increments: float) -> None:
        """Add to the counters; the keyword named like `unit` advances progress."""
        for key, value in increments.items():
            self.counts[key] = self.counts.get(key, 0) + value
        now = time.monotonic()
        if self.enabled and now - self._last_print >= self.interval:
            self._last_print = now
            self._print(now)

    def line(self, now: Optional[float] = None) -> str:
        """The current status line."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        done = self.counts[self.unit]
        parts = [f"{self.name}: {format_count(done)}"]
        if self.total:
            parts[0] += f"/{format_count(self.total)} {self.unit} ({100.0 * done / self.total:.1f}%)"
        else:
            parts[0] += f" {self.unit}"
        for key, value in self.counts.items():
            rate = value / elapsed
            label = "MB/s" if key == "bytes" else f"{key}/s"
            shown = rate / 1e6 if key == "bytes" else rate
            parts.append(f"{shown:.2f} {label}" if key == "bytes" else f"{format_count(shown)} {label}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and done:
            parts.append(f"ETA {format_duration(elapsed * (self.total - done) / done)}")
        return " | ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> str:
        """Print and return the final line."""
        final = self.line()
        if self.enabled:
            print(final + " | done", file=self.stream, flush=True)
        return final
