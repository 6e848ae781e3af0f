"""Data: Megatron-compatible indexed datasets, tokenizers, preprocessing, GPT/blended/SFT datasets."""
