"""megalign: Megatron-style distributed training for native alignment of LLMs during pre-training."""

__version__ = "0.1.0"
