"""The torch floor: setup.py, README and megalign.MIN_TORCH agree, the import check refuses older torch with a
clear message, and the APIs that set the floor exist in the installed torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import megalign

ROOT = Path(__file__).resolve().parents[2]


def test_setup_py_and_readme_require_min_torch() -> None:
    requirements = re.findall(r'"torch>=([0-9.]+),<3"', (ROOT / "setup.py").read_text())
    assert requirements == [megalign.MIN_TORCH]
    readme = (ROOT / "README.md").read_text()
    assert f"torch >= {megalign.MIN_TORCH}" in readme
    assert not re.search(r"torch >= ?2\.[0-5]\b", readme)


@pytest.mark.parametrize("version", ["2.5.1", "2.1.0+cu121", "1.13.1"])
def test_older_torch_is_refused_naming_the_floor(version: str) -> None:
    with pytest.raises(
        ImportError, match=rf"megalign needs torch >= {megalign.MIN_TORCH}, .* torch {re.escape(version)}"
    ):
        megalign.check_torch_version(version)


@pytest.mark.parametrize("version", [megalign.MIN_TORCH + ".0", "2.6.0a0+git1234", "2.13.0+cpu", "3.0.0", None])
def test_the_floor_and_newer_pass(version) -> None:
    megalign.check_torch_version(version)


def test_the_apis_behind_the_floor_exist() -> None:
    megalign.check_torch_version(torch.__version__)
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # 4 query heads over 2 key/value heads
    expected = F.scaled_dot_product_attention(q, kv.repeat_interleave(2, 1), kv.repeat_interleave(2, 1))
    torch.testing.assert_close(F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True), expected)
    assert callable(torch.nn.utils.get_total_norm) and callable(torch.nn.utils.clip_grads_with_norm_)
    assert callable(torch.compiler.is_compiling)
