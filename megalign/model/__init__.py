"""LLaMA-3 / Qwen2 decoder: configuration, presets and counts, the model, and the HF weight-name mapping."""

from __future__ import annotations

from megalign.config.model import (
    PRESETS,
    ModelConfig,
    ModelOptions,
    flops_per_token,
    from_hf_config,
    parameter_count,
    preset,
    to_hf_config,
)
from megalign.model.decoder import GPTModel
from megalign.model.hf_weights import hf_state_dict_to_megalign, megalign_state_dict_to_hf

__all__ = [
    "PRESETS",
    "GPTModel",
    "ModelConfig",
    "ModelOptions",
    "flops_per_token",
    "from_hf_config",
    "hf_state_dict_to_megalign",
    "megalign_state_dict_to_hf",
    "parameter_count",
    "preset",
    "to_hf_config",
]
