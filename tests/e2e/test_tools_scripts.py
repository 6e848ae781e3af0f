"""The Megatron-style scripts in tools/ take the same flags as their `megalign` subcommands."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = {"preprocess_data.py": "preprocess", "train_tokenizer.py": "train-tokenizer", "merge_datasets.py": "merge-datasets"}


@pytest.mark.parametrize("script,command", sorted(SCRIPTS.items()))
def test_script_help_matches_subcommand(script: str, command: str, repo_root: Path) -> None:
    def help_text(argv: list) -> str:
        result = subprocess.run(argv, cwd=repo_root, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("\n", 1)[1]  # drop the usage line's program name

    tool = help_text([sys.executable, str(repo_root / "tools" / script), "--help"])
    cli = help_text([sys.executable, "-m", "megalign.cli", command, "--help"])
    assert tool == cli


def test_unknown_command_and_user_errors_exit_2(tmp_path: Path, repo_root: Path) -> None:
    unknown = subprocess.run([sys.executable, "-m", "megalign.cli", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr
    missing = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "merge_datasets.py"), "--input", str(tmp_path / "absent"),
         "--output-prefix", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "absent" in missing.stderr
