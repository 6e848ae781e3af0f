"""Progress reporting for long-running commands: a live tqdm bar on a terminal, periodic lines elsewhere.

On a TTY (an interactive run) `ProgressMeter` draws a tqdm bar with a percentage, the rate, an ETA and
the other counters' rates; when the stream is not a terminal (SLURM logs, pipes, CI, tests) it prints a
plain status line at most every `interval` seconds instead, so logs stay line-oriented and greppable.
Either way `close()` ends with one plain summary line ending in ``| done``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Optional, TextIO


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


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class ProgressMeter:
    """Counts named quantities and reports progress: a bar on a terminal, else a line every `interval` s.

    The first counter is the unit of progress (e.g. documents); `total` (of that unit), when known,
    gives a percentage and an ETA. Other counters (tokens, bytes) are shown as rates. `bar`: None
    (default) draws a tqdm bar when `stream` is a terminal, True/False force it on/off. `clock` (a
    monotonic time function) is injectable for tests.

        meter = ProgressMeter("preprocess", total=n_docs, unit="docs")
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
        bar: Optional[bool] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = stream
        self.enabled = enabled
        self.counts: Dict[str, float] = {unit: 0}
        self._clock = clock
        self.start = clock()
        self._last_print = self.start
        self._bar: Any = None
        if enabled and (bar if bar is not None else _is_terminal(stream)):
            self._bar = self._open_bar()

    def _open_bar(self) -> Any:
        from tqdm import tqdm  # imported only when a bar is drawn: it is slow to import

        byte_unit = "bytes" in self.unit
        return tqdm(
            total=self.total or None,
            desc=self.name,
            unit="B" if byte_unit else f" {self.unit}",
            unit_scale=True,
            file=self.stream,
            dynamic_ncols=True,
            leave=False,
            mininterval=0.5,
            smoothing=0.1,
        )

    def update(self, **increments: float) -> None:
        """Add to the counters; the keyword named like `unit` advances progress."""
        for key, value in increments.items():
            self.counts[key] = self.counts.get(key, 0) + value
        if not self.enabled:
            return
        now = self._clock()
        if self._bar is not None:
            if now - self._last_print >= 0.5 and len(self.counts) > 1:  # the postfix costs a format
                self._last_print = now
                self._bar.set_postfix_str(self._rates(now, skip_unit=True, sep=", "), refresh=False)
            self._bar.update(increments.get(self.unit, 0))
        elif now - self._last_print >= self.interval:
            self._last_print = now
            self._print(now)

    def _rates(self, now: float, skip_unit: bool = False, sep: str = " | ") -> str:
        elapsed = max(now - self.start, 1e-9)
        parts = []
        for key, value in self.counts.items():
            if skip_unit and key == self.unit:
                continue
            rate = value / elapsed
            parts.append(f"{rate / 1e6:.2f} MB/s" if key == "bytes" else f"{format_count(rate)} {key}/s")
        return sep.join(parts)

    def line(self, now: Optional[float] = None) -> str:
        """The current status line (counts, rates, elapsed time and, with a total, the ETA)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        done = self.counts[self.unit]
        head = f"{self.name}: {format_count(done)}"
        if self.total:
            head += f"/{format_count(self.total)} {self.unit} ({100.0 * done / self.total:.1f}%)"
        else:
            head += f" {self.unit}"
        parts = [head, self._rates(now), f"elapsed {format_duration(elapsed)}"]
        if self.total and done:
            parts.append(f"ETA {format_duration(elapsed * (self.total - done) / done)}")
        return " | ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> str:
        """Remove the bar (if any), print and return the final line."""
        final = self.line()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            print(final + " | done", file=self.stream, flush=True)
        return final
