"""Checkpoint conversion between Hugging Face LLaMA/Qwen2 folders and megalign checkpoints (any TP/PP layout),
and import of Megatron-LM checkpoints (torch_dist or legacy torch format)."""

from megalign.convert.hf_to_megalign import convert_hf_to_megalign
from megalign.convert.megalign_to_hf import convert_megalign_to_hf
from megalign.convert.megatron_to_megalign import convert_megatron_to_megalign

__all__ = ["convert_hf_to_megalign", "convert_megalign_to_hf", "convert_megatron_to_megalign"]
