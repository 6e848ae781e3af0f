"""ProgressMeter: plain periodic lines when not on a terminal, a tqdm bar on one, a final `| done` line."""
from __future__ import annotations

import io
from typing import List

from megalign.utils.progress import ProgressMeter, format_count, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> List[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def test_plain_lines_every_interval_with_rates_and_eta_when_not_a_terminal() -> None:
    clock, stream = FakeClock(), io.StringIO()
    meter = ProgressMeter("dedup", total=100, unit="docs", interval=5.0, stream=stream, clock=clock)
    for _ in range(4):  # 4 s: nothing yet
        clock.now += 1.0
        meter.update(docs=10, bytes=1_000_000)
    assert lines(stream) == []
    clock.now += 1.0
    meter.update(docs=10, bytes=1_000_000)  # 5 s: 50 docs
    assert lines(stream) == ["dedup: 50/100 docs (50.0%) | 10 docs/s | 1.00 MB/s | elapsed 0:00:05 | ETA 0:00:05"]
    clock.now += 1.0
    meter.update(docs=10)
    assert len(lines(stream)) == 1  # the next line waits for the next interval
    clock.now += 4.0
    final = meter.close()
    assert final.startswith("dedup: 60/100 docs (60.0%) | 6 docs/s | 0.50 MB/s | elapsed 0:00:10 | ETA 0:00:06")
    assert lines(stream)[-1] == final + " | done" and len(lines(stream)) == 2
    assert "\r" not in stream.getvalue()  # no bar drawn in a log file


def test_bar_on_a_terminal_instead_of_periodic_lines() -> None:
    clock, stream = FakeClock(), Terminal()
    meter = ProgressMeter("rewrite", total=8, unit="docs", interval=0.0, stream=stream, clock=clock)
    for _ in range(8):
        clock.now += 1.0
        meter.update(docs=1, tokens=100)
    drawn = stream.getvalue()
    assert "rewrite:" in drawn and "%|" in drawn and "/8" in drawn  # tqdm's bar, not our lines
    assert "| elapsed" not in drawn
    final = meter.close()
    assert final.startswith("rewrite: 8/8 docs (100.0%) | 1 docs/s | 100 tokens/s")
    assert stream.getvalue().rstrip().endswith(final + " | done")


def test_bar_and_output_can_be_forced_off() -> None:
    plain = Terminal()
    meter = ProgressMeter("convert", total=2, unit="tensors", interval=0.0, stream=plain, bar=False)
    meter.update(tensors=1)
    meter.close()
    assert "%|" not in plain.getvalue() and plain.getvalue().count("convert: ") == 2
    silent = Terminal()
    quiet = ProgressMeter("convert", total=2, unit="tensors", interval=0.0, stream=silent, enabled=False)
    quiet.update(tensors=2)
    assert quiet.close().startswith("convert: 2/2 tensors") and silent.getvalue() == ""


def test_formatting_helpers() -> None:
    assert format_duration(3725.9) == "1:02:05" and format_duration(-3) == "0:00:00"
    assert [format_count(v) for v in (950, 12_300, 4_560_000, 7.89e9, 2.5)] == ["950", "12.30k", "4.56M", "7.89G",
                                                                               "2.5"]
