"""`megalign train` under preemption (SIGTERM/SIGUSR1) and after a crash (SIGKILL), run as a user runs it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from megalign.checkpoint.storage import list_checkpoints, load_checkpoint, read_latest_step
from megalign.training.preemption import PreemptionHandler

STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss (\S+) \|", re.MULTILINE)


def _argv(prefix: str, model: Path, cache: Path, iters: int, *extra: str) -> List[str]:
    return ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--data-cache-path", str(cache), "--split", "100,0,0", "--seed", "11", "--train-iters", str(iters),
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--eval-iters", "0", "--log-interval", "1", *extra]


def _start(argv: List[str], cwd: Path) -> subprocess.Popen:
    """`python -m megalign.cli train ARGV` with stdout collected line by line on a reader thread."""
    process = subprocess.Popen([sys.executable, "-m", "megalign.cli", "train", *argv], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    process.lines = []  # type: ignore[attr-defined]

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            process.lines.append(line)  # type: ignore[attr-defined]

    process.reader = threading.Thread(target=read, daemon=True)  # type: ignore[attr-defined]
    process.reader.start()  # type: ignore[attr-defined]
    return process


def _output(process: subprocess.Popen) -> str:
    return "".join(process.lines)  # type: ignore[attr-defined]


def _wait_for(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 40.0) -> None:
    """Poll until ``ready()``; fail with the log if the process ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"condition not reached (exit {process.returncode}); output:\n{_output(process)}")
        time.sleep(0.005)


def _finish(process: subprocess.Popen) -> int:
    code = process.wait(timeout=60)
    process.reader.join(timeout=10)  # type: ignore[attr-defined]
    return code


def _step_losses(text: str) -> Dict[int, str]:
    return {int(step): loss for step, loss in STEP_LINE.findall(text)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_at_step_boundary_and_exits_zero(data_prefix: str, sentencepiece_model: Path,
                                                      tmp_path: Path, signum: int) -> None:
    save = tmp_path / "ckpt"
    process = _start(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", 5000, "--save", str(save),
                           "--save-interval", "1000"), tmp_path)
    _wait_for(process, lambda: len(_step_losses(_output(process))) >= 3)
    process.send_signal(signum)
    assert _finish(process) == 0, _output(process)
    out = _output(process)
    name = signal.Signals(signum).name
    match = re.search(rf"received {name}: saved checkpoint (\S+) at step (\d+), exiting", out)
    assert match, out
    step = int(match.group(2))
    assert 3 <= step < 1000 and max(_step_losses(out)) == step
    assert f"training stopped by {name} at step {step}" in out and "Traceback" not in out
    assert read_latest_step(save) == step and list_checkpoints(save) == [step]
    assert Path(match.group(1)) == save / f"iter_{step:07d}"
    with load_checkpoint(save) as checkpoint:
        assert checkpoint.step == step and checkpoint.consumed_samples == 4 * step


def test_sigterm_without_save_exits_zero_and_says_nothing_saved(data_prefix: str, sentencepiece_model: Path,
                                                                tmp_path: Path) -> None:
    process = _start(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", 5000), tmp_path)
    _wait_for(process, lambda: len(_step_losses(_output(process))) >= 2)
    process.terminate()
    assert _finish(process) == 0, _output(process)
    assert re.search(r"received SIGTERM at step \d+: no --save directory, nothing could be saved", _output(process))


def test_sigkill_then_load_continues_exactly(data_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    total, interval = 200, 5
    straight = _start(_argv(data_prefix, sentencepiece_model, tmp_path / "cache", total), tmp_path)
    assert _finish(straight) == 0, _output(straight)  # a process like the others (same threads and environment)
    reference = _step_losses(_output(straight))
    assert sorted(reference) == list(range(1, total + 1))

    save = tmp_path / "ckpt"
    # the killed and the resumed run read through 2 DataLoader worker processes, the reference through none:
    # the losses may not depend on it, and the killed run's workers must not outlive it
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "cache", total, "--save", str(save),
                 "--save-interval", str(interval), "--num-workers", "2")
    crashed = _start(argv, tmp_path)
    _wait_for(crashed, lambda: (read_latest_step(save) or 0) >= interval)
    crashed.kill()
    assert _finish(crashed) == -signal.SIGKILL
    resumed_from = read_latest_step(save)
    assert resumed_from is not None and resumed_from % interval == 0 and resumed_from < total
    first = _step_losses(_output(crashed))
    assert all(first[s] == reference[s] for s in first), (first, reference)

    resumed = _start(argv + ["--load", str(save)], tmp_path)
    assert _finish(resumed) == 0, _output(resumed)
    out = _output(resumed)
    assert f"resumed at step {resumed_from}" in out
    losses = _step_losses(out)
    assert sorted(losses) == list(range(resumed_from + 1, total + 1))
    assert losses == {s: reference[s] for s in range(resumed_from + 1, total + 1)}
    assert read_latest_step(save) == total


def test_handler_restores_previous_handlers_and_ignores_other_threads() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert handler.active and not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert handler.requested and handler.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before

    installed: List[bool] = []
    worker = threading.Thread(target=lambda: installed.append(PreemptionHandler().install()))
    worker.start()
    worker.join()
    assert installed == [False]
