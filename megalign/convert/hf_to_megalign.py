"""Import a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder as a megalign checkpoint at a TP/PP layout.

The output is an ordinary megalign checkpoint (step 0, model tensors only) under global names, written as
the files a TP x PP job would write (``model_tp{t}_pp{p}.safetensors``, each tensor split into parts along
its tensor-parallel axis, see megalign/checkpoint/format.py), so ``megalign train --finetune --load
SAVE`` reads it at this or any other layout. Memory: each output file is streamed a tensor part at a
time (its header planned from the HF shapes and dtypes), and parts are read lazily from the HF files, so the
peak is about the largest single tensor, not a file or the model.

Vocabulary padding: the embedding and LM-head rows are padded with zeros up to Megatron's padded size
(``--make-vocab-size-divisible-by`` x TP, as the trainer pads its tokenizer's vocabulary); the original
vocabulary size, architecture and ``config.json`` are kept in the checkpoint's ``extra["hf"]`` so that
``megalign-to-hf`` strips the padding again. Tokenizer files found in the HF folder are copied to
``SAVE/tokenizer/``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from megalign.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    ShardSpec,
    TensorSpec,
    dtype_name,
    iter_dir_name,
    model_file_name,
)
from megalign.checkpoint.hf_files import HFModelFolder, copy_tokenizer_files
from megalign.checkpoint.model_record import TOKENIZER_DIR
from megalign.checkpoint.storage import json_or_raise, write_metadata
from megalign.config.layout import stage_layer_ranges
from megalign.config.model import ARCHITECTURES, ModelConfig, from_hf_config
from megalign.data.tokenizers import padded_vocab_size
from megalign.errors import ConfigError, DataFormatError
from megalign.model.hf_weights import weight_names
from megalign.utils.atomic import atomic_write, fsync_dir, install_directory
from megalign.utils.progress import ProgressMeter
from megalign.utils.safetensors_stream import StreamingSafetensorsWriter

__all__ = ["VOCAB_TENSORS", "convert_hf_to_megalign", "tensor_split"]

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
_IGNORED_HF = ("rotary_emb.inv_freq",)
PathLike = Union[str, Path]


def tensor_split(name: str, config: ModelConfig, tp: int) -> Tuple[Optional[int], int, int]:
    """``(axis, pieces, replicas)`` of megalign tensor ``name`` over ``tp`` tensor-parallel ranks, as the
    parallel layers split it: column-parallel weights and biases (q/k/v, gate/up, embedding, LM head) along
    axis 0, row-parallel weights (o_proj, down_proj) along axis 1, norm weights replicated (axis None).
    Key/value projections are split into ``tp / replicas`` pieces when TP exceeds the key/value heads."""
    leaf = name.split(".")[-2]
    if name.endswith("norm.weight"):
        return None, 1, 1
    if leaf in ("o_proj", "down_proj"):
        return 1, tp, 1
    if leaf in ("k_proj", "v_proj"):
        replicas = max(tp // config.num_key_value_heads, 1)
        return 0, tp // replicas, replicas
    if leaf in ("q_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head"):
        return 0, tp, 1
    raise DataFormatError(f"no tensor-parallel rule for tensor {name!r}")


def _check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} {value!r} must be a positive integer")
    kv = config.num_key_value_heads
    problems = []
    if config.num_attention_heads % tp:
        problems.append(f"num_attention_heads={config.num_attention_heads}")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size={config.intermediate_size}")
    if (tp > kv and tp % kv) or (tp <= kv and kv % tp):
        problems.append(f"num_key_value_heads={kv} (or be a multiple of it)")
    if problems:
        raise ConfigError(f"--tensor-model-parallel-size {tp} must divide {', '.join(problems)}")
    if pp > config.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} exceeds num_hidden_layers={config.num_layers}")


@dataclass(frozen=True)
class _Entry:
    """One megalign tensor of the checkpoint: its HF source, padded global shape and split."""

    name: str
    hf_name: str
    hf_shape: Tuple[int, ...]
    shape: Tuple[int, ...]
    axis: Optional[int]
    pieces: int
    replicas: int


def _entries(config: ModelConfig, padded_vocab: int, tp: int) -> List[_Entry]:
    out = []
    for ours, hf, shape in weight_names(config):
        padded = (padded_vocab,) + shape[1:] if ours in VOCAB_TENSORS else shape
        axis, pieces, replicas = tensor_split(ours, config, tp)
        out.append(_Entry(ours, hf, shape, padded, axis, pieces, replicas))
    return out


def _stage_of(name: str, config: ModelConfig, ranges: List[range]) -> List[int]:
    """Pipeline stages holding ``name`` (a tied embedding sits on the first and the last)."""
    last = len(ranges) - 1
    if name == "embed_tokens.weight":
        return sorted({0, last}) if config.tie_word_embeddings else [0]
    if name in ("final_norm.weight", "lm_head.weight"):
        return [last]
    layer = int(name.split(".")[1])
    return [stage for stage, layers in enumerate(ranges) if layer in layers]


def _check_tensors(folder: HFModelFolder, config: ModelConfig, entries: List[_Entry]) -> None:
    """Every tensor the config needs is present with its shape, and nothing else is (before writing)."""
    present = set(folder.names())
    needed = {e.hf_name for e in entries}
    missing = [e.hf_name for e in entries if e.hf_name not in present]
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
        shape = folder.shape(entry.hf_name)
        if shape != entry.hf_shape:
            raise DataFormatError(
                f"{folder.file_of(entry.hf_name)}: tensor {entry.hf_name} has shape {list(shape)}, "
                f"config.json implies {list(entry.hf_shape)}"
            )


def _read_part(folder: HFModelFolder, entry: _Entry, part: int) -> torch.Tensor:
    """Part ``part`` of the padded global tensor, read lazily (the input stays unmapped between reads, so
    memory holds the parts being written, not the model); rows past the HF vocabulary are zeros."""
    try:
        return _read_padded_part(folder, entry, part)
    finally:
        folder.release_maps()


def _read_padded_part(folder: HFModelFolder, entry: _Entry, part: int) -> torch.Tensor:
    if entry.axis is None:
        return folder.read(entry.hf_name)
    size = entry.shape[entry.axis] // entry.pieces
    start, stop = part * size, (part + 1) * size
    available = entry.hf_shape[entry.axis]
    if stop <= available:
        return folder.read(entry.hf_name, entry.axis, start, stop)
    shape = list(entry.shape)
    shape[entry.axis] = size
    data = folder.read(entry.hf_name, entry.axis, min(start, available), available)  # empty past the vocabulary
    out = torch.zeros(shape, dtype=data.dtype)
    out.narrow(entry.axis, 0, data.shape[entry.axis]).copy_(data)
    return out


def _write_model_file(
    path: Path,
    folder: HFModelFolder,
    entries: List[_Entry],
    stages: Dict[str, List[int]],
    specs: Dict[str, TensorSpec],
    t: int,
    p: int,
    meter: ProgressMeter,
) -> Dict[str, Any]:
    """Stream tensor rank ``t``'s parts of stage ``p``'s tensors into ``path``, one part in memory at a time;
    records each part in ``specs``. Replicated tensors (norms, k/v parts shared by several ranks) are stored
    once, by the first rank holding them."""
    plan: List[Tuple[_Entry, int, Tuple[int, ...]]] = []
    for entry in entries:
        if p not in stages[entry.name]:
            continue
        meter.update(tensors=1)
        if (entry.axis is None and t != 0) or t % entry.replicas:
            continue
        dims = list(entry.shape)
        if entry.axis is not None:
            dims[entry.axis] //= entry.pieces
        plan.append((entry, t // entry.replicas, tuple(dims)))
    writer = StreamingSafetensorsWriter(path, [(e.name, shape, folder.dtype(e.hf_name)) for e, _, shape in plan])
    try:
        for entry, part, shape in plan:
            tensor = _read_part(folder, entry, part)
            writer.add(entry.name, tensor)
            meter.update(bytes=tensor.numel() * tensor.element_size())
            spec = specs[entry.name]
            spec.dtype = dtype_name(tensor.dtype)
            size = shape[entry.axis] if entry.axis is not None else 0
            spec.shards.append(ShardSpec(path.name, part, part * size, (part + 1) * size))
            del tensor
        return writer.close()
    except BaseException:
        writer.abort()
        raise


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
    _check_layout(config, tp, pp)
    padded = padded_vocab_size(config.vocab_size, make_vocab_size_divisible_by, tp)
    entries = _entries(config, padded, tp)
    _check_tensors(folder, config, entries)
    root = Path(save_dir)
    if (root / LATEST_FILE).exists():
        raise ConfigError(f"--save {root}: already holds a checkpoint; choose a new directory")

    ranges = stage_layer_ranges(config.num_layers, pp)
    stages = {e.name: _stage_of(e.name, config, ranges) for e in entries}
    specs = {e.name: TensorSpec(e.name, "model", e.shape, "", e.axis, e.pieces) for e in entries}
    files: Dict[str, Dict[str, Any]] = {}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{iter_dir_name(0)}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    meter = ProgressMeter(
        "hf-to-megalign", total=sum(len(s) for s in stages.values()) * tp, unit="tensors", enabled=progress
    )
    try:
        for p in range(pp):
            for t in range(tp):
                fname = model_file_name(t, p)
                files[fname] = {
                    "kind": "model",
                    "tensor": t,
                    "pipeline": p,
                    **_write_model_file(tmp / fname, folder, entries, stages, specs, t, p, meter),
                }
        extra = {
            "hf": {"architecture": architecture, "vocab_size": config.vocab_size, "config": folder.config},
            "converted_from": str(folder.path),
        }
        ours = dataclasses.replace(config, vocab_size=padded)
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": 0,
            "consumed_samples": 0,
            "saved_at": time.time(),
            "config": {"model_config": ours.to_dict()},
            "extra": json_or_raise(extra, "extra"),
            "parallel": {"tensor": tp, "pipeline": pp, "data": 1},
            "files": files,
            "tensors": {name: spec.to_json() for name, spec in sorted(specs.items())},
        }
        write_metadata(tmp, metadata)
        _install_tokenizer(folder.path, root)
        final = root / iter_dir_name(0)
        install_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        folder.close()
    with atomic_write(root / LATEST_FILE) as handle:
        handle.write("0\n")
    meter.close()
    return final


def _install_tokenizer(hf_dir: Path, root: Path) -> None:
    """Copy the tokenizer files into ``root/tokenizer`` through a temp directory renamed into place."""
    tmp = root / f".{TOKENIZER_DIR}.tmp-{uuid.uuid4().hex}"
    try:
        if copy_tokenizer_files(hf_dir, tmp):
            fsync_dir(tmp)
            install_directory(tmp, root / TOKENIZER_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
