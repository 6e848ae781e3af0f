"""Reading a Hugging Face model folder lazily: ``config.json`` and the weights, one tensor (or slice) at a time.

Weights may be one ``model.safetensors``, sharded ``*.safetensors`` with ``model.safetensors.index.json``
(or without it: every ``*.safetensors`` file in the folder, each tensor in exactly one), or the older
``pytorch_model.bin`` / ``pytorch_model-*.bin`` (+ ``pytorch_model.bin.index.json``). Safetensors files
are read with ``safe_open`` (memory-mapped; a slice reads only its bytes); ``.bin`` files with
``torch.load(weights_only=True, mmap=True)`` (no pickle code runs, nothing is read until used).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from megalign.checkpoint.storage import open_safetensors
from megalign.errors import ConfigError, DataFormatError
from megalign.utils.safetensors_stream import SAFETENSORS_CODES

__all__ = ["GENERATION_CONFIG", "TOKENIZER_FILES", "HFModelFolder", "copy_tokenizer_files", "read_json"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION_CONFIG = "generation_config.json"
PathLike = Union[str, Path]
_DTYPE_OF_CODE = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object from ``path``; DataFormatError naming the file when it is missing or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def copy_tokenizer_files(source: Path, target: Path, with_generation_config: bool = True) -> List[str]:
    """Copy the tokenizer files (and generation_config.json) present in ``source`` into ``target``."""
    names = TOKENIZER_FILES + ((GENERATION_CONFIG,) if with_generation_config else ())
    copied = [name for name in names if (source / name).is_file()]
    if copied:
        target.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copyfile(source / name, target / name)
    return copied


class HFModelFolder:
    """A Hugging Face model folder: its config and a lazy view of its weights by HF tensor name."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"--hf-dir {self.path}: not a directory")
        self.config = read_json(self.path / "config.json")
        self._safe: Dict[str, Any] = {}
        self._bin: Dict[str, Dict[str, torch.Tensor]] = {}
        self._file_of = self._weight_files()

    # ---- discovering the files -------------------------------------------------------------------------
    def _weight_files(self) -> Dict[str, str]:
        """HF tensor name -> file name, from an index or the single weights file."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.path / index_name
            if index_path.is_file():
                weight_map = read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise DataFormatError(f"{index_path}: 'weight_map' is missing or empty")
                for fname in set(weight_map.values()):
                    if not isinstance(fname, str) or "/" in fname or not (self.path / fname).is_file():
                        raise DataFormatError(
                            f"{index_path}: lists weights file {fname!r}, which is missing from {self.path}"
                        )
                return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return {name: single for name in self._names_in(single)}
        shards = sorted(p.name for p in self.path.glob("*.safetensors") if p.is_file())
        if shards:
            return self._unindexed_shards(shards)
        raise DataFormatError(
            f"{self.path}: no weights found (expected model.safetensors, sharded *.safetensors "
            "with model.safetensors.index.json, or pytorch_model*.bin)"
        )

    def _unindexed_shards(self, shards: List[str]) -> Dict[str, str]:
        """HF tensor name -> file over sharded safetensors files without an index; a name in two files is an error."""
        file_of: Dict[str, str] = {}
        for fname in shards:
            for name in self._names_in(fname):
                if name in file_of:
                    raise DataFormatError(
                        f"{self.path}: tensor {name!r} is in both {file_of[name]} and {fname} "
                        "(and no model.safetensors.index.json says which to use)"
                    )
                file_of[name] = fname
        return file_of

    def _names_in(self, fname: str) -> List[str]:
        if fname.endswith(".safetensors"):
            return list(self._open_safe(fname).keys())
        return list(self._open_bin(fname).keys())

    def _open_safe(self, fname: str) -> Any:
        if fname not in self._safe:
            self._safe[fname] = open_safetensors(self.path / fname)
        return self._safe[fname]

    def _open_bin(self, fname: str) -> Dict[str, torch.Tensor]:
        if fname not in self._bin:
            try:
                state = torch.load(self.path / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # unpickling errors of many types
                raise DataFormatError(
                    f"{self.path / fname}: cannot load PyTorch weights (weights_only=True): {exc}"
                ) from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise DataFormatError(f"{self.path / fname}: expected a dict of tensors")
            self._bin[fname] = state
        return self._bin[fname]

    # ---- reading -------------------------------------------------------------------------------------------
    def names(self) -> List[str]:
        """Every HF tensor name in the folder."""
        return list(self._file_of)

    def file_of(self, name: str) -> Path:
        """The file holding ``name``."""
        return self.path / self._file_of[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        """Shape of tensor ``name`` (read from the header; nothing is loaded)."""
        fname = self._file_of[name]
        try:
            if fname.endswith(".safetensors"):
                return tuple(self._open_safe(fname).get_slice(name).get_shape())
            return tuple(self._open_bin(fname)[name].shape)
        except Exception as exc:
            raise DataFormatError(
                f"{self.path / fname}: tensor {name!r} listed in the index is missing: {exc}"
            ) from None

    def dtype(self, name: str) -> torch.dtype:
        """dtype of tensor ``name`` (read from the header; nothing is loaded)."""
        fname = self._file_of[name]
        if not fname.endswith(".safetensors"):
            return self._open_bin(fname)[name].dtype
        code = self._open_safe(fname).get_slice(name).get_dtype()
        dtype = _DTYPE_OF_CODE.get(code)
        if dtype is None:
            raise DataFormatError(
                f"{self.path / fname}: tensor {name!r} has dtype {code}, which is not a float "
                f"or integer dtype megalign stores ({', '.join(sorted(_DTYPE_OF_CODE))})"
            )
        return dtype

    def read(self, name: str, axis: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Tensor ``name`` or its rows ``[start, stop)`` along ``axis`` (a new, contiguous tensor)."""
        fname = self._file_of[name]
        index: Tuple[slice, ...] = ()
        if axis is not None:
            index = (slice(None),) * axis + (slice(start, stop),)
        try:
            if fname.endswith(".safetensors"):
                handle = self._open_safe(fname)
                tensor = handle.get_slice(name)[index] if index else handle.get_tensor(name)
            else:
                tensor = self._open_bin(fname)[name][index].clone()
        except Exception as exc:
            raise DataFormatError(f"{self.path / fname}: cannot read tensor {name!r}: {exc}") from None
        return tensor.contiguous()

    def release_maps(self) -> None:
        """Unmap the safetensors files (reopened lazily): pages read so far stop counting in this process's RSS."""
        self._safe.clear()

    def close(self) -> None:
        """Drop open handles and memory maps."""
        self._safe.clear()
        self._bin.clear()
