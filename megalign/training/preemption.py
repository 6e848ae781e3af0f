"""Graceful preemption: remember SIGTERM/SIGUSR1 so the trainer can checkpoint at a step boundary and exit.

Schedulers (Slurm, Kubernetes) send SIGTERM, or a configured signal such as SIGUSR1, some time before they kill
a job. Like Megatron's ``--exit-signal-handler`` (always on here), :class:`PreemptionHandler` only records the
signal; the training loop checks :attr:`PreemptionHandler.requested` after each optimizer step, saves and stops.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional, Sequence

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Records the first of ``signals`` received; installs handlers only in the main thread.

    Use as a context manager (or call :meth:`install` and :meth:`close`); closing restores the handlers that
    were in place before. Outside the main thread Python cannot install signal handlers, so the handler stays
    inactive there and :attr:`requested` is always False.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    @property
    def active(self) -> bool:
        """Whether the handlers are installed."""
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived since :meth:`install`."""
        return self.received is not None

    @property
    def signal_name(self) -> str:
        """Name of the received signal (``"SIGTERM"``), or ``""`` when none arrived."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def install(self) -> bool:
        """Install the handlers; returns False (and does nothing) outside the main thread."""
        if self.active or threading.current_thread() is not threading.main_thread():
            return self.active
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:  # keep the first; a second signal changes nothing
            self.received = signum

    def close(self) -> None:
        """Restore the handlers that were installed before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
