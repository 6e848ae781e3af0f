"""`torchrun ... pretrain_gpt.py` as users launch it: one node with several processes, and two nodes simulated on
loopback (two torchrun agents joined by a c10d rendezvous on 127.0.0.1). Losses equal the single-process run's."""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from megalign.config import load_config
from megalign.training.trainer import train

STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss (\S+) \|", re.MULTILINE)
STEPS = 3


def _argv(prefix: str, model: Path, cache: Path) -> List[str]:
    return ["--model-preset", "tiny", "--num-layers", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(model), "--data-cache-path", str(cache), "--split", "100,0,0", "--seed", "9",
            "--lr", "1e-3", "--train-iters", str(STEPS), "--eval-iters", "0", "--log-interval", "1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(text: str) -> Dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(text)}


@pytest.fixture(scope="module")
def reference(data_prefix: str, sentencepiece_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    cache = tmp_path_factory.mktemp("cache")
    result = train(load_config(_argv(data_prefix, sentencepiece_model, cache)), stream=io.StringIO())
    return {"losses": result.losses, "cache": cache}


def _environment() -> Dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_single_node_torchrun(repo_root: Path, reference: Dict, data_prefix: str, sentencepiece_model: Path) -> None:
    flags = _argv(data_prefix, sentencepiece_model, reference["cache"]) + ["--tensor-model-parallel-size", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               str(repo_root / "pretrain_gpt.py"), *flags]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300, env=_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = _losses(result.stdout)
    assert sorted(losses) == list(range(1, STEPS + 1)), result.stdout[-2000:]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference["losses"][step], rel=1e-5, abs=2e-6)
    assert "layout TP 2, PP 1, DP 2" in result.stdout


def test_two_nodes_on_loopback(repo_root: Path, reference: Dict, data_prefix: str, sentencepiece_model: Path) -> None:
    flags = _argv(data_prefix, sentencepiece_model, reference["cache"]) + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    port = _free_port()
    agents = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "megalign-test",
                   "--node-rank", str(node), "--local-addr", "127.0.0.1", str(repo_root / "pretrain_gpt.py"), *flags]
        agents.append(subprocess.Popen(command, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env=_environment()))
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=300)
            outputs.append(out)
            assert agent.returncode == 0, out[-4000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    logged = [_losses(out) for out in outputs if _losses(out)]
    assert len(logged) == 1, outputs  # only the logging rank (last stage, DP 0, TP 0) prints steps
    for step, loss in logged[0].items():
        assert loss == pytest.approx(reference["losses"][step], rel=1e-5, abs=2e-6)
    assert sorted(logged[0]) == list(range(1, STEPS + 1))
