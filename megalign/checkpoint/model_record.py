"""What a checkpoint records about its model: the architecture, the true vocabulary and its padded rows, the
tokenizer identity, the Hugging Face record, and the dtypes it loads as.

Every writer records the same things in ``metadata.json``:

* ``extra.model_config``: the :class:`ModelConfig` (``vocab_size`` = the embedding's stored rows,
  ``true_vocab_size`` = the real vocabulary). Checkpoints of ``megalign convert hf-to-megalign`` (and older
  trainer checkpoints) keep it in ``config.model_config`` or only as the training config, which are read too.
* ``extra.vocab``: ``{"true_size": N, "padded_rows": R}``. Rows past ``N`` are padding, whose number depends
  on the tensor-parallel size of the saving job; a loader pads or strips them for its own layout.
* ``extra.tokenizer``: ``{"type", "model", "size"}`` of the tokenizer the model was trained with.
* ``extra.hf``: ``{"architecture", "vocab_size", "config"}`` of the Hugging Face model it came from (import, or
  a run started from an import or with a Hugging Face tokenizer), so an export writes a complete folder.
* ``SAVE/tokenizer/``: the Hugging Face tokenizer files (chat template, special tokens, generation config).

:func:`read_model_record` reads all of them, whatever wrote the checkpoint.
"""

from __future__ import annotations

import dataclasses
import filecmp
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from megalign.checkpoint.hf_files import copy_tokenizer_files
from megalign.checkpoint.storage import Checkpoint
from megalign.config import TrainingConfig
from megalign.config.model import ModelConfig
from megalign.errors import DataFormatError
from megalign.utils.atomic import fsync_dir, install_directory

__all__ = [
    "DTYPES",
    "TOKENIZER_DIR",
    "ModelRecord",
    "checkpoint_model_config",
    "install_tokenizer_files",
    "read_model_record",
]

TOKENIZER_DIR = "tokenizer"  # SAVE/tokenizer/: the HF tokenizer files a checkpoint directory carries
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}  # --dtype of loaders and export


# A trainer checkpoint written before the Megatron model flags existed, without a preset, built this model
# (Megatron's defaults for absent flags now differ: biases, LayerNorm, GELU, tied embeddings).
_LEGACY_MODEL_FLAGS = {
    "swiglu": True,
    "normalization": "RMSNorm",
    "position_embedding_type": "rope",
    "disable_bias_linear": True,
    "untie_embeddings_and_output_weights": True,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}


@dataclass(frozen=True)
class ModelRecord:
    """A checkpoint's model: its shape (``model_config.vocab_size`` = stored rows, ``true_vocab_size`` set), the
    tokenizer it was trained with, the Hugging Face record, and the folder of tokenizer files (if any)."""

    model_config: ModelConfig
    tokenizer: Dict[str, Any] = field(default_factory=dict)
    hf: Dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Optional[Path] = None

    @property
    def true_vocab_size(self) -> int:
        """The real vocabulary (rows past it are padding)."""
        return self.model_config.real_vocab_size

    def metadata_extra(self) -> Dict[str, Any]:
        """The ``extra`` entries that record this model in a checkpoint's metadata."""
        out: Dict[str, Any] = {
            "model_config": self.model_config.to_dict(),
            "vocab": {"true_size": self.true_vocab_size, "padded_rows": self.model_config.vocab_size},
            "tokenizer": dict(self.tokenizer),
        }
        if self.hf:
            out["hf"] = dict(self.hf)
        return out


def _stored_model_config(checkpoint: Checkpoint) -> ModelConfig:
    extra_config = checkpoint.extra.get("model_config")
    if isinstance(extra_config, dict):
        return ModelConfig.from_dict(extra_config)
    stored = checkpoint.config.get("model_config")
    if isinstance(stored, dict):
        return ModelConfig.from_dict(stored)
    if "model" in checkpoint.config:
        embed = checkpoint.metadata.tensors.get("embed_tokens.weight")
        if embed is None:
            raise DataFormatError(f"{checkpoint.path}: has no tensor embed_tokens.weight")
        # the saving job's layout is not this process's: leave the parallel section out of the validation
        training = {key: value for key, value in checkpoint.config.items() if key != "parallel"}
        model = training.get("model")
        if isinstance(model, dict) and "swiglu" not in model and model.get("model_preset") is None:
            training["model"] = {**_LEGACY_MODEL_FLAGS, **model}
        return TrainingConfig.from_dict(training).model_config(vocab_size=embed.shape[0])
    raise DataFormatError(
        f"{checkpoint.path}: metadata holds no model config (neither 'model_config' from "
        "`megalign convert hf-to-megalign` nor a training config from `megalign train`)"
    )


def _true_vocab(checkpoint: Checkpoint, config: ModelConfig, hf: Mapping[str, Any]) -> int:
    """The recorded true vocabulary: extra.vocab, the config's true_vocab_size, the HF record, else every row."""
    vocab = checkpoint.extra.get("vocab")
    candidates = [
        vocab.get("true_size") if isinstance(vocab, dict) else None,
        config.true_vocab_size,
        hf.get("vocab_size"),
    ]
    for value in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= config.vocab_size:
            raise DataFormatError(
                f"{checkpoint.path}: recorded true vocabulary size {value!r} must be a positive integer no "
                f"larger than the embedding's {config.vocab_size} rows"
            )
        return value
    return config.vocab_size


def read_model_record(checkpoint: Checkpoint) -> ModelRecord:
    """The model a checkpoint holds, from whichever records its writer left (see the module doc)."""
    config = _stored_model_config(checkpoint)
    hf_entry = checkpoint.extra.get("hf")
    hf: Dict[str, Any] = dict(hf_entry) if isinstance(hf_entry, dict) else {}
    config = dataclasses.replace(config, true_vocab_size=_true_vocab(checkpoint, config, hf))
    tokenizer_entry = checkpoint.extra.get("tokenizer")
    tokenizer: Dict[str, Any] = dict(tokenizer_entry) if isinstance(tokenizer_entry, dict) else {}
    data = checkpoint.config.get("data")
    if not tokenizer and isinstance(data, dict) and data.get("tokenizer_type") is not None:
        tokenizer = {"type": data.get("tokenizer_type"), "model": data.get("tokenizer_model"), "size": None}
    folder = checkpoint.path.parent / TOKENIZER_DIR
    return ModelRecord(config, tokenizer, hf, folder if folder.is_dir() else None)


def checkpoint_model_config(checkpoint: Checkpoint) -> ModelConfig:
    """The model shape as stored (``vocab_size`` = the stored rows, ``true_vocab_size`` = the real vocabulary)."""
    return read_model_record(checkpoint).model_config


def install_tokenizer_files(source: Path, root: Path) -> bool:
    """Copy the Hugging Face tokenizer files in ``source`` to ``root/tokenizer`` (through a temp directory renamed
    into place; an existing different copy is replaced). Returns whether ``source`` held any."""
    target = root / TOKENIZER_DIR
    if source.resolve() == target.resolve():
        return True
    tmp = root / f".{TOKENIZER_DIR}.tmp-{uuid.uuid4().hex}"
    try:
        copied = copy_tokenizer_files(source, tmp)
        if not copied:
            return False
        if target.is_dir():
            same = filecmp.dircmp(tmp, target)
            if not (same.left_only or same.right_only or same.diff_files or same.funny_files):
                return True
        fsync_dir(tmp)
        install_directory(tmp, target)  # a different copy is replaced: the run now trains with these files
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
