"""Import a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder as a megalign checkpoint at a TP/PP layout.

The output is an ordinary megalign checkpoint (step 0, model tensors only) under global names, written by
the shared megalign/convert/checkpoint_writer.py as the files a TP x PP job would write
(``model_tp{t}_pp{p}.safetensors``, each tensor split into parts along its tensor-parallel axis), so
``megalign train --finetune --load SAVE`` reads it at this or any other layout.
Memory: each output file is streamed a tensor part at a time (its header planned from the HF shapes and
dtypes), and parts are read lazily from the HF files, so the peak
is about the largest single tensor, not a file or the model.

Vocabulary padding: the embedding and LM-head rows are padded with zeros up to Megatron's padded size
(``--make-vocab-size-divisible-by`` x TP, as the trainer pads its tokenizer's vocabulary); the original
vocabulary size, architecture and ``config.json`` are kept in the checkpoint's ``extra["hf"]`` so that
``megalign-to-hf`` strips the padding again. Tokenizer files found in the HF folder are copied to
``SAVE/tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from megalign.checkpoint.format import VOCAB_TENSORS  # re-exported: defined with the checkpoint format
from megalign.checkpoint.hf_files import HFModelFolder
from megalign.config.model import ARCHITECTURES, ModelConfig, from_hf_config
from megalign.convert.checkpoint_writer import PlannedTensor, check_layout, plan_tensors, tensor_split, write_checkpoint
from megalign.data.tokenizers import padded_vocab_size
from megalign.errors import ConfigError, DataFormatError
from megalign.model.hf_weights import weight_names

__all__ = ["VOCAB_TENSORS", "convert_hf_to_megalign", "tensor_split"]

_IGNORED_HF = ("rotary_emb.inv_freq",)
PathLike = Union[str, Path]


class _HFSource:
    """The HF folder's tensors under megalign names (a :class:`~megalign.convert.checkpoint_writer.TensorSource`)."""

    def __init__(self, folder: HFModelFolder, hf_names: Dict[str, str]) -> None:
        self.folder, self.hf_names = folder, hf_names

    def dtype(self, name: str) -> torch.dtype:
        return self.folder.dtype(self.hf_names[name])

    def read(self, name: str, axis: Optional[int], start: int, stop: int) -> torch.Tensor:
        return self.folder.read(self.hf_names[name], axis, start, stop)

    def release(self) -> None:
        self.folder.release_maps()  # the input stays unmapped between reads


def _check_tensors(
    folder: HFModelFolder, config: ModelConfig, entries: List[PlannedTensor], hf_names: Dict[str, str]
) -> None:
    """Every tensor the config needs is present with its shape, and nothing else is (before writing)."""
    present = set(folder.names())
    needed = {hf_names[e.name] for e in entries}
    missing = [hf_names[e.name] for e in entries if hf_names[e.name] not in present]
    if missing:
        raise DataFormatError(
            f"{folder.path}: missing tensor {missing[0]}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            + " that config.json requires"
        )
    ignored = _IGNORED_HF + (("lm_head.weight",) if config.tie_word_embeddings else ())
    unexpected = sorted(n for n in present - needed if not n.endswith(ignored))
    if unexpected:
        raise DataFormatError(
            f"{folder.file_of(unexpected[0])}: unexpected tensor {unexpected[0]}"
            + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; config.json does not describe it (wrong number of layers, biases or tied "
            "embeddings?)"
        )
    for entry in entries:
        hf_name = hf_names[entry.name]
        shape = folder.shape(hf_name)
        if shape != entry.source_shape:
            raise DataFormatError(
                f"{folder.file_of(hf_name)}: tensor {hf_name} has shape {list(shape)}, "
                f"config.json implies {list(entry.source_shape)}"
            )


def convert_hf_to_megalign(
    hf_dir: PathLike,
    save_dir: PathLike,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = True,
) -> Path:
    """Write the HF model in ``hf_dir`` as a megalign checkpoint (step 0) under ``save_dir``; returns its path.

    Raises ConfigError for an unsupported architecture or layout and DataFormatError naming the file and
    tensor for missing, unexpected or misshapen weights. ``save_dir`` must not already hold a checkpoint.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    folder = HFModelFolder(hf_dir)
    architectures = folder.config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"{folder.path / 'config.json'}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    config = from_hf_config(folder.config)
    try:
        check_layout(config, tp, pp)
        padded = padded_vocab_size(config.vocab_size, make_vocab_size_divisible_by, tp)
        entries = plan_tensors(config, padded, tp)
        hf_names = {ours: hf for ours, hf, _ in weight_names(config)}
        _check_tensors(folder, config, entries, hf_names)
        extra = {
            "hf": {"architecture": architecture, "vocab_size": config.vocab_size, "config": folder.config},
            "converted_from": str(folder.path),
        }
        return write_checkpoint(
            save_dir,
            config,
            _HFSource(folder, hf_names),
            tp,
            pp,
            padded,
            config.vocab_size,
            extra,
            "hf-to-megalign",
            tokenizer_dir=folder.path,
            progress=progress,
        )
    finally:
        folder.close()
