"""Write whole-model tensors from a converter's source as a megalign checkpoint (step 0, weights only) at a
TP x PP layout: the files a TP x PP job would write (``model_tp{t}_pp{p}.safetensors``, each tensor split into
parts along its tensor-parallel axis, see megalign/checkpoint/format.py), so ``megalign train --finetune
--load SAVE`` reads it at this or any other layout.

The source (:class:`TensorSource`) serves megalign-named global tensors, or slices of them, by name; each
output file is streamed a tensor part at a time (its header planned from the shapes and dtypes), so the
peak memory is about the largest part the source must materialise, not a file or the model. Vocabulary
rows past the source's are written as zeros. The checkpoint is installed atomically (temp directory,
rename, then ``latest_checkpointed_iteration.txt``). Used by hf_to_megalign and megatron_to_megalign.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Tuple, Union

import torch

from megalign.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_FILE,
    VOCAB_TENSORS,
    ShardSpec,
    TensorSpec,
    dtype_name,
    iter_dir_name,
    model_file_name,
)
from megalign.checkpoint.model_record import TOKENIZER_DIR, install_tokenizer_files
from megalign.checkpoint.storage import json_or_raise, write_metadata
from megalign.config.layout import stage_layer_ranges
from megalign.config.model import ModelConfig
from megalign.data.tokenizers import build_tokenizer
from megalign.errors import ConfigError, DataFormatError
from megalign.model.hf_weights import weight_names
from megalign.utils.atomic import atomic_write, install_directory
from megalign.utils.progress import ProgressMeter
from megalign.utils.safetensors_stream import StreamingSafetensorsWriter

__all__ = ["PlannedTensor", "TensorSource", "check_layout", "plan_tensors", "tensor_split", "write_checkpoint"]

PathLike = Union[str, Path]


class TensorSource(Protocol):
    """Where a converter's tensors come from, by megalign name (global layer numbers, unpadded shapes)."""

    def dtype(self, name: str) -> torch.dtype:
        """dtype tensor ``name`` is stored with."""

    def read(self, name: str, axis: Optional[int], start: int, stop: int) -> torch.Tensor:
        """Tensor ``name`` (``axis`` None) or its rows ``[start, stop)`` along ``axis``, contiguous."""

    def release(self) -> None:
        """Drop memory maps / caches held for the last read (called after each part is written)."""


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


def check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """``ConfigError`` naming the flag unless TP divides the heads and FFN size and PP fits the layers."""
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
class PlannedTensor:
    """One megalign tensor of the checkpoint: its source shape, padded global shape and split."""

    name: str
    source_shape: Tuple[int, ...]
    shape: Tuple[int, ...]
    axis: Optional[int]
    pieces: int
    replicas: int


def plan_tensors(config: ModelConfig, padded_vocab: int, tp: int) -> List[PlannedTensor]:
    """Every tensor of a ``config`` model (``vocab_size`` = the source's rows), vocabulary rows padded to
    ``padded_vocab``, in the order the files store them."""
    out = []
    for ours, _, shape in weight_names(config):
        padded = (padded_vocab,) + shape[1:] if ours in VOCAB_TENSORS else shape
        axis, pieces, replicas = tensor_split(ours, config, tp)
        out.append(PlannedTensor(ours, shape, padded, axis, pieces, replicas))
    return out


def _stages_of(name: str, config: ModelConfig, ranges: List[range]) -> List[int]:
    """Pipeline stages holding ``name`` (a tied embedding sits on the first and the last)."""
    last = len(ranges) - 1
    if name == "embed_tokens.weight":
        return sorted({0, last}) if config.tie_word_embeddings else [0]
    if name in ("final_norm.weight", "lm_head.weight"):
        return [last]
    layer = int(name.split(".")[1])
    return [stage for stage, layers in enumerate(ranges) if layer in layers]


def _read_part(source: TensorSource, entry: PlannedTensor, part: int) -> torch.Tensor:
    """Part ``part`` of the padded global tensor; rows past the source's vocabulary are zeros. The source
    releases what it held afterwards, so memory holds the parts being written, not the model."""
    try:
        if entry.axis is None:
            return source.read(entry.name, None, 0, 0)
        size = entry.shape[entry.axis] // entry.pieces
        start, stop = part * size, (part + 1) * size
        available = entry.source_shape[entry.axis]
        if stop <= available:
            return source.read(entry.name, entry.axis, start, stop)
        shape = list(entry.shape)
        shape[entry.axis] = size
        out = torch.zeros(shape, dtype=source.dtype(entry.name))
        if start < available:
            data = source.read(entry.name, entry.axis, start, available)
            out.narrow(entry.axis, 0, data.shape[entry.axis]).copy_(data)
        return out
    finally:
        source.release()


def _write_model_file(
    path: Path,
    source: TensorSource,
    entries: List[PlannedTensor],
    stages: Dict[str, List[int]],
    specs: Dict[str, TensorSpec],
    t: int,
    p: int,
    meter: ProgressMeter,
) -> Dict[str, Any]:
    """Stream tensor rank ``t``'s parts of stage ``p``'s tensors into ``path``, one part in memory at a time;
    records each part in ``specs``. Replicated tensors (norms, k/v parts shared by several ranks) are stored
    once, by the first rank holding them."""
    plan: List[Tuple[PlannedTensor, int, Tuple[int, ...]]] = []
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
    writer = StreamingSafetensorsWriter(path, [(e.name, shape, source.dtype(e.name)) for e, _, shape in plan])
    try:
        for entry, part, shape in plan:
            tensor = _read_part(source, entry, part)
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


def write_checkpoint(
    save_dir: PathLike,
    config: ModelConfig,
    source: TensorSource,
    tp: int,
    pp: int,
    padded_vocab: int,
    true_vocab: int,
    extra: Dict[str, Any],
    label: str,
    tokenizer_dir: Optional[Path] = None,
    progress: bool = True,
) -> Path:
    """Write ``source``'s tensors of a ``config`` model (``vocab_size`` = the source's rows) as the step-0
    checkpoint of ``save_dir`` at layout ``tp`` x ``pp``; returns the ``iter_0000000`` directory.

    The metadata records ``config.model_config`` (``vocab_size`` = ``padded_vocab`` stored rows,
    ``true_vocab_size`` = ``true_vocab``), ``extra`` plus ``extra.vocab``; tokenizer files in
    ``tokenizer_dir`` are copied to ``SAVE/tokenizer/``. ``save_dir`` must not already hold a checkpoint.
    """
    root = Path(save_dir)
    if (root / LATEST_FILE).exists():
        raise ConfigError(f"--save {root}: already holds a checkpoint; choose a new directory")
    check_layout(config, tp, pp)
    entries = plan_tensors(config, padded_vocab, tp)
    ranges = stage_layer_ranges(config.num_layers, pp)
    stages = {e.name: _stages_of(e.name, config, ranges) for e in entries}
    specs = {e.name: TensorSpec(e.name, "model", e.shape, "", e.axis, e.pieces) for e in entries}
    files: Dict[str, Dict[str, Any]] = {}
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{iter_dir_name(0)}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    meter = ProgressMeter(label, total=sum(len(s) for s in stages.values()) * tp, unit="tensors", enabled=progress)
    try:
        for p in range(pp):
            for t in range(tp):
                fname = model_file_name(t, p)
                files[fname] = {
                    "kind": "model",
                    "tensor": t,
                    "pipeline": p,
                    **_write_model_file(tmp / fname, source, entries, stages, specs, t, p, meter),
                }
        ours = dataclasses.replace(config, vocab_size=padded_vocab, true_vocab_size=true_vocab)
        if tokenizer_dir is not None and install_tokenizer_files(tokenizer_dir, root):
            extra = {**extra, "tokenizer": _tokenizer_identity(root / TOKENIZER_DIR)}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": 0,
            "consumed_samples": 0,
            "saved_at": time.time(),
            "config": {"model_config": ours.to_dict()},
            "extra": json_or_raise({**extra, "vocab": {"true_size": true_vocab, "padded_rows": padded_vocab}}, "extra"),
            "parallel": {"tensor": tp, "pipeline": pp, "data": 1},
            "files": files,
            "tensors": {name: spec.to_json() for name, spec in sorted(specs.items())},
        }
        write_metadata(tmp, metadata)
        final = root / iter_dir_name(0)
        install_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(root / TOKENIZER_DIR, ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()  # leave nothing behind: a source error found mid-write is like one found before
        raise
    with atomic_write(root / LATEST_FILE) as handle:
        handle.write("0\n")
    meter.close()
    return final


def _tokenizer_identity(folder: Path) -> Dict[str, Any]:
    """``extra.tokenizer`` of an imported checkpoint: its Hugging Face tokenizer files and their size."""
    size = None
    if (folder / "tokenizer.json").is_file():
        size = build_tokenizer("HuggingFaceTokenizer", str(folder)).vocab_size
    return {"type": "HuggingFaceTokenizer", "model": TOKENIZER_DIR, "size": size}
