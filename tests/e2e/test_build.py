"""The package build: the C++ extension is importable, and a missing compiler gives one clear message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_extension_is_built_and_importable() -> None:
    import megalign._helpers as helpers

    assert Path(helpers.__file__).suffix == ".so"


def test_missing_compiler_gives_clear_message(tmp_path: Path, repo_root: Path) -> None:
    env = dict(os.environ, CC="/nonexistent/cc", CXX="/nonexistent/c++")
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"), "--build-lib", str(tmp_path / "l")],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "no C++ compiler found" in result.stderr, result.stderr[-2000:]
    assert "install g++" in result.stderr
