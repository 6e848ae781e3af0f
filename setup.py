"""Build megalign: the Python package plus the C++ dataset-index extension (csrc/helpers.cpp).

The extension needs only pybind11 and a C++17 compiler at build time, never torch.
"""
from __future__ import annotations

import glob
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    import pybind11
except ImportError:  # pragma: no cover - pyproject.toml normally provides it
    sys.exit("megalign: building needs pybind11 (pip install pybind11), then retry `pip install -e .`")

from setuptools import Extension


class BuildExtWithClearErrors(build_ext):
    """build_ext that turns a missing or failing C++ compiler into one actionable message."""

    def build_extensions(self) -> None:
        compiler = getattr(self.compiler, "compiler_cxx", None) or ["c++"]
        import shutil

        if shutil.which(compiler[0]) is None:
            sys.exit(
                f"megalign: no C++ compiler found (looked for '{compiler[0]}'). The dataset-index "
                "extension csrc/helpers.cpp needs one: install g++ (Debian/Ubuntu: apt-get install "
                "g++; macOS: xcode-select --install), then rerun `pip install -e .`."
            )
        try:
            super().build_extensions()
        except Exception as error:  # CompileError, LinkError
            sys.exit(
                f"megalign: compiling csrc/helpers.cpp failed: {error}\n"
                "It needs a C++17 compiler (g++ >= 7 or clang >= 5) and pybind11 >= 2.10."
            )


helpers_extension = Extension(
    "megalign._helpers",
    sources=["csrc/helpers.cpp"],
    depends=sorted(glob.glob("csrc/dataset_index/*.h") + glob.glob("csrc/bpe/*.h")),
    include_dirs=[pybind11.get_include()],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-Wall", "-fvisibility=hidden"],
)

setup(
    name="megalign",
    version="0.1.0",
    description="Megatron-style distributed trainer for native alignment of LLMs during pre-training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["megalign", "megalign.*"]),
    package_data={"megalign": ["py.typed", "align/guidelines/*.yaml", "align/lexicons/*.yaml",
                              "demo/data/*.jsonl"]},  # the demo's sample corpus
    ext_modules=[helpers_extension],
    cmdclass={"build_ext": BuildExtWithClearErrors},
    install_requires=[
        # A range, so an existing CUDA or CPU torch is kept (the Makefile installs 2.13.0 CPU if none).
        "torch>=2.6,<3",  # megalign.MIN_TORCH: tests/unit/test_torch_floor.py keeps the two equal
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.15",
        "tiktoken>=0.5",
        "zstandard>=0.21",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",  # progress bars on a terminal (megalign.utils.progress)
        "httpx>=0.27",  # pooled keep-alive HTTP for the endpoint client (megalign.align.http_transport)
        "regex>=2023",  # exact fast path for byte-level BPE tokenization (megalign.data.fast_bpe)
        # --tensorboard-dir: events go through torch.utils.tensorboard.SummaryWriter, which needs it
        # (imported only when that flag is given).
        "tensorboard>=2.14",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "hypothesis>=6",
            "datasketch>=1.5",
            # Test-only baseline: interop and index-equality tests skip cleanly without it.
            "megatron-core==0.16.1",
            # Quality gates of `make test` (pinned: a new release may format or type-check differently).
            "ruff==0.17.6",
            "mypy==2.4.1",
            "types-PyYAML",
        ],
        "hf": ["transformers>=4.40", "safetensors>=0.4", "tokenizers>=0.15", "jinja2>=3"],
        # The quality report's PNG figures (`megalign align report`; --no-plots works without it).
        "report": ["matplotlib>=3.7"],
        # Optional GPU fast paths; never required, imported lazily (see docs/gpu.md once it exists).
        "gpu": ["flash-attn>=2.5", "transformer-engine>=1.8"],
    },
    entry_points={"console_scripts": ["megalign=megalign.cli:main"]},
)
