"""Megatron's checkpoint idioms for ``megalign train``.

* ``--save X --load X`` on every (re)start: a ``--load`` directory that holds no checkpoint yet starts the run
  from scratch (one log line), as Megatron does; one whose checkpoints are all invalid stays an error.
* ``--use-checkpoint-args`` (and a ``--load`` given no shape flags): the model is built from the architecture the
  checkpoint records (:mod:`megalign.checkpoint.model_record`), the way a preset defines it; an explicit shape
  flag that disagrees with the record stops with both values named.
* What a run's checkpoints record about its model (:func:`run_model_record`), and its Hugging Face tokenizer
  files copied to ``SAVE/tokenizer`` (:func:`save_tokenizer_files`), so that every trainer checkpoint exports
  to a complete Hugging Face folder and resumes at any tensor-parallel size.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from megalign.checkpoint.format import ITER_DIR_RE, LATEST_FILE
from megalign.checkpoint.model_record import ModelRecord, install_tokenizer_files, read_model_record
from megalign.checkpoint.storage import Checkpoint, find_latest_valid
from megalign.config import TrainingConfig
from megalign.config.loading import build_parser, values_from_namespace
from megalign.config.model import ModelConfig
from megalign.data.tokenizers import HuggingFaceTokenizer, Tokenizer
from megalign.errors import DataFormatError

__all__ = [
    "holds_checkpoint",
    "load_training_config",
    "open_load_checkpoint",
    "run_model_record",
    "save_tokenizer_files",
    "training_config_from_namespace",
    "training_config_from_values",
]

# Without a preset these define a model (the checkpoint's record then is not needed to build one).
_SHAPE_FLAGS = ("model_preset", "num_layers", "hidden_size", "num_attention_heads")


def holds_checkpoint(load_dir: str) -> bool:
    """Whether ``load_dir`` holds any checkpoint (valid or not): a latest-iteration file or an ``iter_*`` folder."""
    root = Path(load_dir)
    if (root / LATEST_FILE).exists():
        return True
    return root.is_dir() and any(ITER_DIR_RE.match(child.name) for child in root.iterdir())


def open_load_checkpoint(load_dir: str, log: Any = None) -> Optional[Checkpoint]:
    """The newest valid checkpoint in ``load_dir``; None when the directory holds none yet (a fresh start);
    DataFormatError when it holds checkpoints but none is valid. ``log`` receives warnings about skipped ones."""
    if not holds_checkpoint(load_dir):
        return None
    checkpoint, problems = find_latest_valid(load_dir)
    for problem in problems:
        if log is not None:
            log(f"warning: {problem}")
    if checkpoint is None:
        raise DataFormatError(
            f"--load {load_dir}: no valid checkpoint found" + (f" ({problems[-1]})" if problems else "")
        )
    return checkpoint


def _checkpoint_model(values: Mapping[str, Any]) -> Optional[ModelConfig]:
    """The recorded model of the --load checkpoint when it is to define the shape (see the module doc)."""
    load = values.get("load")
    if load is None:
        return None
    if not values.get("use_checkpoint_args") and any(values.get(dest) is not None for dest in _SHAPE_FLAGS):
        return None
    checkpoint = open_load_checkpoint(str(load))
    if checkpoint is None:
        return None  # nothing to read yet: the flags define the model of the fresh run
    try:
        return read_model_record(checkpoint).model_config
    finally:
        checkpoint.close()


def training_config_from_values(values: Dict[str, Any]) -> TrainingConfig:
    """The validated config of ``values`` (``{dest: value}``), with the --load checkpoint's model as the base
    where it defines the shape."""
    return TrainingConfig.from_values(values, checkpoint_model=_checkpoint_model(values))


def training_config_from_namespace(args: argparse.Namespace) -> TrainingConfig:
    """:func:`training_config_from_values` of parsed ``megalign train`` flags (and their --config YAML)."""
    return training_config_from_values(values_from_namespace(args))


def load_training_config(argv: Sequence[str]) -> TrainingConfig:
    """The training config of a command line, as ``megalign train`` builds it."""
    return training_config_from_namespace(build_parser().parse_args(list(argv)))


def _tokenizer_folder(tokenizer: Tokenizer) -> Optional[Path]:
    """The folder of a Hugging Face tokenizer's files (None for other tokenizer types)."""
    if not isinstance(tokenizer, HuggingFaceTokenizer) or tokenizer.model_path is None:
        return None
    path = Path(tokenizer.model_path)
    return path if path.is_dir() else path.parent


def run_model_record(model_config: ModelConfig, tokenizer: Tokenizer, loaded: Optional[ModelRecord]) -> ModelRecord:
    """What a training run's checkpoints record about its model: the shape at this layout, the tokenizer, and
    the Hugging Face record (the loaded checkpoint's, or one made from a Hugging Face tokenizer)."""
    hf = dict(loaded.hf) if loaded is not None and loaded.hf else {}
    if not hf and isinstance(tokenizer, HuggingFaceTokenizer):
        ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eos, "pad_token_id": tokenizer.pad}
        hf = {
            "architecture": model_config.architecture,
            "vocab_size": model_config.real_vocab_size,
            "config": {key: value for key, value in ids.items() if value is not None},
        }
    info = {"type": tokenizer.tokenizer_type, "model": tokenizer.model_path, "size": tokenizer.vocab_size}
    return ModelRecord(model_config, info, hf, _tokenizer_folder(tokenizer))


def save_tokenizer_files(record: ModelRecord, save_dir: str) -> bool:
    """Copy the run's Hugging Face tokenizer files (chat template, special tokens, generation config) into
    ``save_dir/tokenizer`` so that its checkpoints export and serve whole; returns whether there were any."""
    if record.tokenizer_dir is None:
        return False
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return install_tokenizer_files(record.tokenizer_dir, Path(save_dir))
