"""LLaMA-3 / Qwen2 decoder: configuration, presets and counts (the modules come with the model)."""
from __future__ import annotations

from megalign.model.config import (PRESETS, ModelConfig, flops_per_token, from_hf_config, parameter_count, preset,
                                   to_hf_config)

__all__ = ["PRESETS", "ModelConfig", "flops_per_token", "from_hf_config", "parameter_count", "preset",
           "to_hf_config"]
