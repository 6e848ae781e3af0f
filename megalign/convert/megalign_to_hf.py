"""Export a megalign checkpoint (any TP/PP layout) as a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder.

Whole global tensors are read one at a time (``Checkpoint.read_tensor`` assembles them from whatever files
hold their parts), the vocabulary padding is stripped back to the checkpoint's true vocabulary (see
megalign.checkpoint.model_record; or ``vocab_size`` given by the caller), and the tensors are written in
size-bounded shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (one
``model.safetensors`` when everything fits one shard), next to ``config.json``, ``generation_config.json``
and the tokenizer files kept in ``LOAD/tokenizer/`` (imported checkpoints, and training runs started from one
or with a Hugging Face tokenizer, carry them). The folder is built in a temp directory and renamed
into place. Memory: about one shard.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from megalign.checkpoint.hf_files import GENERATION_CONFIG, copy_tokenizer_files
from megalign.checkpoint.model_record import DTYPES, ModelRecord, read_model_record
from megalign.checkpoint.storage import load_checkpoint
from megalign.config.model import to_hf_config
from megalign.convert.hf_to_megalign import VOCAB_TENSORS
from megalign.errors import ConfigError, DataFormatError
from megalign.model.hf_weights import hf_norm_weight, weight_names
from megalign.utils.atomic import fsync_dir, write_json_atomic
from megalign.utils.progress import ProgressMeter
from megalign.utils.safetensors_stream import StreamingSafetensorsWriter, tensor_nbytes

__all__ = ["convert_megalign_to_hf", "describe", "parse_size"]

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
PathLike = Union[str, Path]


def parse_size(text: Union[str, int]) -> int:
    """Bytes in ``"5GB"`` (decimal units, as transformers), ``"500MiB"`` (binary) or a plain integer."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ConfigError(f"--max-shard-size {text!r} must be positive")
    return value


def _hf_info(record: ModelRecord, vocab_size: Optional[int]) -> Tuple[int, Optional[str], Dict]:
    """(HF vocabulary size, architecture or None, original config.json or {})."""
    hf, padded = record.hf, record.model_config.vocab_size
    vocab = vocab_size if vocab_size is not None else record.true_vocab_size
    if not isinstance(vocab, int) or not 0 < vocab <= padded:
        raise ConfigError(f"vocabulary size {vocab!r} must be a positive integer <= the checkpoint's {padded} rows")
    original = hf.get("config")
    architecture = hf.get("architecture")
    return (
        vocab,
        architecture if isinstance(architecture, str) else None,
        original if isinstance(original, dict) else {},
    )


class _ShardWriter:
    """Streams tensors into size-bounded safetensors shards: the shards and every header are planned from the
    tensors' names, shapes and dtype up front, so each tensor is written as soon as it is read and memory
    holds one tensor at a time, not a shard."""

    def __init__(
        self, directory: Path, max_bytes: int, entries: List[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype
    ) -> None:
        self.directory, self.dtype = directory, dtype
        self.shards: List[List[Tuple[str, Tuple[int, ...], int]]] = [[]]
        size = 0
        for name, shape in entries:
            nbytes = tensor_nbytes(shape, dtype)
            if self.shards[-1] and size + nbytes > max_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), nbytes))
            size += nbytes
        self.total_bytes = sum(n for shard in self.shards for _, _, n in shard)
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name, _, _ in shard}
        self.writer: Optional[StreamingSafetensorsWriter] = None
        self.current = -1

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``name`` (in the planned order) into its shard."""
        index = self.shard_of[name]
        if index != self.current:
            if self.writer is not None:
                self.writer.close()
            plan = [(n, shape, self.dtype) for n, shape, _ in self.shards[index]]
            self.writer = StreamingSafetensorsWriter(self.directory / f".shard{index}", plan, {"format": "pt"})
            self.current = index
        assert self.writer is not None  # opened above for the tensor's shard
        self.writer.add(name, tensor)

    def finish(self) -> None:
        """Close the last shard and name the shards (one: model.safetensors; several: numbered, plus the index)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        count = len(self.shards)
        if count == 1:
            (self.directory / ".shard0").rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, shard in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / f".shard{i}").rename(self.directory / fname)
            weight_map.update({name: fname for name, _, _ in shard})
        write_json_atomic(
            self.directory / "model.safetensors.index.json",
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
        )

    def abort(self) -> None:
        """Close an open shard file without checks (on error)."""
        if self.writer is not None:
            self.writer.abort()


def convert_megalign_to_hf(
    load_dir: PathLike,
    hf_dir: PathLike,
    dtype: str = "bf16",
    max_shard_size: Any = "5GB",
    step: Optional[int] = None,
    vocab_size: Optional[int] = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint in ``load_dir`` (latest, or ``step``) as a Hugging Face folder ``hf_dir``.

    ``dtype``: bf16, fp16 or fp32. ``vocab_size`` overrides the recorded true vocabulary (the rows kept).
    ``hf_dir`` must not exist or be empty. Returns ``hf_dir``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    target = Path(hf_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--hf-dir {target}: exists and is not an empty directory; choose a new one")
    checkpoint = load_checkpoint(load_dir, step)
    record = read_model_record(checkpoint)
    vocab, architecture, original = _hf_info(record, vocab_size)
    config = dataclasses.replace(record.model_config, vocab_size=vocab, true_vocab_size=None)
    hf_config = {
        **{k: original[k] for k in _TOKEN_IDS if k in original},
        **to_hf_config(config, architecture),
        "torch_dtype": str(DTYPES[dtype]).replace("torch.", ""),
    }
    names = weight_names(config)
    stored = checkpoint.metadata.tensors
    missing = [ours for ours, _, _ in names if ours not in stored]
    if missing:
        raise DataFormatError(f"{checkpoint.path}: missing tensor {missing[0]} that the model config requires")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    meter = ProgressMeter("megalign-to-hf", total=len(names), unit="tensors", enabled=progress)
    writer = _ShardWriter(tmp, max_bytes, [(hf_name, shape) for _, hf_name, shape in names], DTYPES[dtype])
    try:
        for ours, hf_name, shape in names:
            tensor = (
                checkpoint.read_tensor(ours, 0, 0, vocab) if ours in VOCAB_TENSORS else checkpoint.read_tensor(ours)
            )
            checkpoint.close()  # unmap the files read so far: memory holds one tensor, not the model
            if tuple(tensor.shape) != shape:
                raise DataFormatError(
                    f"{checkpoint.path}: tensor {ours} has shape {list(stored[ours].shape)}, the "
                    f"model config implies {list(shape)}"
                )
            tensor = hf_norm_weight(ours, tensor, config).to(DTYPES[dtype])  # 1 + w for --apply-layernorm-1p
            writer.add(hf_name, tensor)
            meter.update(tensors=1, bytes=tensor.numel() * tensor.element_size())
        writer.finish()
        write_json_atomic(tmp / "config.json", hf_config)
        if record.tokenizer_dir is not None:
            copy_tokenizer_files(record.tokenizer_dir, tmp)
        if not (tmp / GENERATION_CONFIG).exists():
            write_json_atomic(
                tmp / GENERATION_CONFIG,
                {**{k: original[k] for k in _TOKEN_IDS if k in original}, "_from_model_config": True},
            )
        fsync_dir(tmp)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
        fsync_dir(target.parent)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        checkpoint.close()
    meter.close()
    return target


def describe(path: Path) -> str:
    """One line naming the files of an exported folder (for the CLI's summary)."""
    files = sorted(p.name for p in path.iterdir())
    return f"{path}: {len(files)} files ({', '.join(files[:6])}{', ...' if len(files) > 6 else ''})"
