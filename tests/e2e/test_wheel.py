"""`megalign demo` from a built wheel, installed in a fresh venv, run outside the source tree.

The demo's sample corpus is package data (megalign/demo/data/sample.jsonl): this checks that the wheel and
the sdist carry it and that the installed demo finds it without the checkout. The fresh venv sees the test
venv's dependencies (torch, numpy, ...) through a .pth file listing the test venv's site-packages; a folder
added that way does not have its own .pth files processed, so the test venv's editable megalign stays
invisible and `import megalign` resolves to the wheel's copy (asserted).
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

SAMPLE_IN_PACKAGE = "megalign/demo/data/sample.jsonl"
# Not part of the source tree a build needs: VCS data, virtualenvs, caches, build outputs, demo outputs.
_IGNORED_NAMES = {".git", ".venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                  ".hypothesis", "demo_output", ".whl", ".gl", "_work"}
_IGNORED_SUFFIXES = (".egg-info", ".so", ".pyc")
# Fewer training and fine-tuning steps than the demo's defaults (120 and 40): the packaging is what is under
# test here, and tests/e2e/test_demo.py runs the default demo. Every step still runs.
TRAIN_ITERS, SFT_ITERS = 24, 8
# Lines of the demo's output that show each step ran to its end (the markers of tests/e2e/test_demo.py).
DEMO_MARKERS = ("1. Train a tokenizer", "2. Split the corpus", "3. Merge", "4. Blended GPT datasets",
                "5. Train the tiny", f"training finished at step {TRAIN_ITERS // 2} ", "6. Resume",
                f"resumed at step {TRAIN_ITERS // 2} ", f"training finished at step {TRAIN_ITERS} ",
                "7. Parallel training", "layout TP 2, PP 2, DP 1, sequence parallel", "training finished at step 20 ",
                "training finished at step 30 ", "8. Native alignment", "dedup: kept",
                "seed: chose 96 documents (ppl-stratified)", "annotate: 96 records", "build-sft:",
                f"training finished at step {SFT_ITERS} ", "9. Rewrite the corpus", "serving ",
                "rewrite: 46 records (46 rewritten)", "10. Quality report", "| urls |",
                "11. Export the TP 2 x PP 2 checkpoint", "transformers LlamaForCausalLM: loss", "demo finished")


def _cxx_compiler_missing() -> bool:
    """True when the compiler setup.py would use for csrc/helpers.cpp is not on PATH."""
    command = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(command.split()[0]) is None


pytestmark = pytest.mark.skipif(_cxx_compiler_missing(), reason="no C++ compiler: the wheel cannot be built")


def _ignore(_: str, names: List[str]) -> List[str]:
    return [n for n in names if n in _IGNORED_NAMES or n.endswith(_IGNORED_SUFFIXES)]


def _clean_env(extra_path: Path) -> Dict[str, str]:
    """The environment without anything that would make a child Python see the checkout or the test venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PATH=f"{extra_path}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(command: List[str], cwd: Path, env: Dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """A copy of the working tree, so that building writes build/ and *.egg-info there, not in the checkout."""
    target = tmp_path_factory.mktemp("source") / "megalign-src"
    shutil.copytree(repo_root, target, ignore=_ignore)
    return target


def test_sdist_carries_the_sample(source_tree: Path, tmp_path: Path) -> None:
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    result = _run([sys.executable, "-c", code], source_tree, _clean_env(Path(sys.executable).parent), 300)
    assert result.returncode == 0, result.stderr[-3000:]
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert SAMPLE_IN_PACKAGE in names
    assert {"megalign/demo/__init__.py", "megalign/demo/run.py", "megalign/demo/alignment.py"} <= names


def test_demo_runs_from_an_installed_wheel(source_tree: Path, tmp_path: Path) -> None:
    outer_env = _clean_env(Path(sys.executable).parent)
    wheels = tmp_path / "wheels"
    result = _run([sys.executable, "-m", "pip", "wheel", str(source_tree), "--no-deps", "--no-build-isolation",
                   "-w", str(wheels)], source_tree, outer_env, 900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (wheel,) = wheels.glob("megalign-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert SAMPLE_IN_PACKAGE in names and any(n.startswith("megalign/_helpers") for n in names)

    venv = tmp_path / "venv"
    result = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, outer_env, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    python, env = venv / "bin" / "python", _clean_env(venv / "bin")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, env, 60).stdout.strip())
    dependencies = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "megalign_test_dependencies.pth").write_text("\n".join(dependencies) + "\n", encoding="utf-8")

    unrelated = tmp_path / "unrelated_cwd"
    unrelated.mkdir()
    result = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                   str(wheel)], unrelated, env, 600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    located = _run([str(python), "-c", "import megalign, megalign._helpers, megalign.demo as d; "
                    "print(megalign.__file__); print(megalign._helpers.__file__); print(d.__file__)"],
                   unrelated, env, 120)
    assert located.returncode == 0, located.stderr[-3000:]
    paths = [Path(line) for line in located.stdout.splitlines()]
    assert len(paths) == 3 and all(p.resolve().is_relative_to(purelib.resolve()) for p in paths), located.stdout
    installed_sample = paths[2].parent / "data" / "sample.jsonl"

    assert list(unrelated.iterdir()) == []
    workdir = tmp_path / "out"
    result = _run([str(venv / "bin" / "megalign"), "demo", "--workdir", str(workdir), "--train-iters", str(TRAIN_ITERS),
                   "--sft-iters", str(SFT_ITERS)], unrelated, env, 900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    missing = [marker for marker in DEMO_MARKERS if marker not in out]
    assert not missing, f"demo output lacks {missing}:\n{out[-3000:]}"
    assert f"--input {installed_sample} " in out  # step 1 read the installed wheel's sample
    assert (workdir / "checkpoints" / f"iter_{TRAIN_ITERS:07d}" / "metadata.json").is_file()
    assert (workdir / "worker_checkpoints" / f"iter_{SFT_ITERS:07d}" / "metadata.json").is_file()
    assert (workdir / "hf_export" / "model.safetensors").is_file()
    assert list(unrelated.iterdir()) == []  # nothing written to the current directory
