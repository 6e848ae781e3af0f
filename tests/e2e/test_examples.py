"""The launch scripts in examples/: the CPU one runs; every script's training flags pass the configuration
checks (flag names, layout constraints) at the world size it launches."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import List

import pytest

from megalign.config import load_config

# script -> world size it launches (nodes x processes per node)
SCRIPTS = {"train_gpu_single_node.sh": 8, "slurm_llama3_8b.sbatch": 16, "slurm_llama3_70b.sbatch": 64,
           "train_worker_sft.sh": 8, "train_cpu_torchrun.sh": 4}
VALUES = {"DATA": "0.7 data/a_text_document 0.3 data/b_text_document", "TOKENIZER": "tok/", "SAVE": "ckpt",
          "LOAD": "base", "OUT": "data/worker", "TP": "2", "PP": "2", "TRAIN_ITERS": "40", "DEMO": "demo_output"}


def training_flags(script: Path) -> List[str]:
    """The arguments after pretrain_gpt.py in ``script``, with its variables filled in."""
    text = script.read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "pretrain_gpt.py" in line and not line.lstrip().startswith("#"))
    tail = line.split("pretrain_gpt.py", 1)[1].replace('"${LOAD_FLAGS[@]}"', "")
    tail = re.sub(r"\$\{?(\w+)\}?", lambda m: VALUES.get(m.group(1), m.group(1)), tail)
    return shlex.split(tail)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_flags_pass_the_configuration_checks(repo_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                    name: str) -> None:
    script = repo_root / "examples" / name
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    monkeypatch.setenv("WORLD_SIZE", str(SCRIPTS[name]))
    config = load_config(training_flags(script))
    assert config.world_size == SCRIPTS[name] and config.data_parallel_size >= 1


def test_cpu_torchrun_example_trains_and_saves(repo_root: Path, data_prefix: str, sentencepiece_model: Path,
                                               tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(DATA=data_prefix, TOKENIZER=str(sentencepiece_model), TRAIN_ITERS="6", SAVE=str(tmp_path / "ckpt"))
    result = subprocess.run(["bash", str(repo_root / "examples" / "train_cpu_torchrun.sh")], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "layout TP 2, PP 2, DP 1, sequence parallel" in result.stdout
    assert "training finished at step 6" in result.stdout
    assert (tmp_path / "ckpt" / "iter_0000006" / "metadata.json").is_file()
