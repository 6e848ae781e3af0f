"""What a checkpoint records about its model: the shape, where its tokenizer files live, the dtypes it loads as.

A checkpoint written by ``megalign convert hf-to-megalign`` stores the padded ``ModelConfig`` in its metadata
(``config.model_config``) and the Hugging Face tokenizer files in ``LOAD/tokenizer/``; one written by
``megalign train`` stores the training configuration, from which the shape follows with the embedding's rows.
Inference and export read both through :func:`checkpoint_model_config`.
"""

from __future__ import annotations

import torch

from megalign.checkpoint.storage import Checkpoint
from megalign.config import TrainingConfig
from megalign.config.model import ModelConfig
from megalign.errors import DataFormatError

__all__ = ["DTYPES", "TOKENIZER_DIR", "checkpoint_model_config"]

TOKENIZER_DIR = "tokenizer"  # LOAD/tokenizer/: the HF tokenizer files an imported checkpoint carries
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}  # --dtype of loaders and export


def checkpoint_model_config(checkpoint: Checkpoint) -> ModelConfig:
    """The (padded) model shape: recorded at import, or the training config of a trainer checkpoint."""
    stored = checkpoint.config.get("model_config")
    if isinstance(stored, dict):
        return ModelConfig.from_dict(stored)
    if "model" in checkpoint.config:
        embed = checkpoint.metadata.tensors.get("embed_tokens.weight")
        if embed is None:
            raise DataFormatError(f"{checkpoint.path}: has no tensor embed_tokens.weight")
        # the saving job's layout is not this process's: leave the parallel section out of the validation
        training = {key: value for key, value in checkpoint.config.items() if key != "parallel"}
        return TrainingConfig.from_dict(training).model_config(vocab_size=embed.shape[0])
    raise DataFormatError(
        f"{checkpoint.path}: metadata holds no model config (neither 'model_config' from "
        "`megalign convert hf-to-megalign` nor a training config from `megalign train`)"
    )
