"""megalign: Megatron-style distributed training for native alignment of LLMs during pre-training."""

import re
from importlib import metadata
from typing import Optional

__version__ = "0.1.0"

# The oldest torch megalign runs on (setup.py requires the same): torch.nn.utils.get_total_norm and
# clip_grads_with_norm_ (the optimizer's gradient clipping) are 2.6; SDPA's enable_gqa (grouped-query
# attention) is 2.5; fused AdamW on CPU is 2.4; torch.compiler.is_compiling is 2.3.
MIN_TORCH = "2.6"


def check_torch_version(version: Optional[str]) -> None:
    """Raise ImportError naming :data:`MIN_TORCH` when ``version`` (torch's, e.g. "2.13.0+cpu") is older;
    None (torch not installed, or without package metadata) passes: importing torch reports that itself."""
    if version is None:
        return
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < tuple(int(part) for part in MIN_TORCH.split(".")):
        raise ImportError(
            f"megalign needs torch >= {MIN_TORCH}, this environment has torch {version}: "
            f"upgrade it (pip install 'torch>={MIN_TORCH}', CUDA or CPU build)"
        )


def _installed_torch() -> Optional[str]:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


check_torch_version(_installed_torch())
