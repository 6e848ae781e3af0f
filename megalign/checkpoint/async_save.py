"""Checkpoint saving in a background thread (``--async-save``), so training continues while files are written.

:meth:`AsyncCheckpointSaver.submit` copies every tensor to fresh CPU memory and captures the RNG state
before returning, so the training step that follows can change parameters freely; the thread then runs
:func:`~megalign.checkpoint.storage.save_checkpoint`, which keeps its atomicity (``latest`` moves only
after the directory is complete). At most one save is in flight: a new submit first waits for the previous
one. A failed background save is raised from the next :meth:`submit` or :meth:`wait`, never swallowed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from megalign.checkpoint.storage import capture_rng_state, save_checkpoint

__all__ = ["AsyncCheckpointSaver", "snapshot"]


def snapshot(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached CPU copies of ``tensors`` that later in-place updates cannot reach."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}


class AsyncCheckpointSaver:
    """Runs one :func:`save_checkpoint` at a time in a daemon thread; ``on_saved(path)`` is called from it."""

    def __init__(self, on_saved: Optional[Callable[[Path], None]] = None) -> None:
        self.on_saved = on_saved
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(
        self,
        save_dir: str,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        optimizer_state: Mapping[str, torch.Tensor],
        **metadata: Any,
    ) -> None:
        """Snapshot the state now and write checkpoint ``step`` in the background (after any previous save)."""
        self.wait()
        arguments = dict(metadata, rng=capture_rng_state(), optimizer_state=snapshot(optimizer_state))
        model_state = snapshot(model_state)
        self._thread = threading.Thread(
            target=self._run, args=(save_dir, step, model_state, arguments), name=f"megalign-save-{step}", daemon=True
        )
        self._thread.start()

    def _run(self, save_dir: str, step: int, model_state: Dict[str, torch.Tensor], arguments: Dict[str, Any]) -> None:
        try:
            path = save_checkpoint(save_dir, step, model_state, **arguments)
            if self.on_saved is not None:
                self.on_saved(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
