"""Load a megalign checkpoint for inference in one process: the model (eval mode, chosen dtype) and its tokenizer.

Both kinds of checkpoint load: those written by ``megalign convert hf-to-megalign`` (the model shape in the
metadata's ``config.model_config``, the HF tokenizer files in ``LOAD/tokenizer/``) and those written by
``megalign train`` (the shape from the training config and the embedding's rows, the tokenizer named by
the recorded ``--tokenizer-type`` / ``--tokenizer-model``), at any TP/PP layout they were saved with.

The tokenizer is, in this order:

1. the one given: a built ``tokenizer``, or ``tokenizer_type`` and ``tokenizer_model`` (a folder or ``.json``
   file alone means HuggingFaceTokenizer);
2. the training config's ``data.tokenizer_type`` / ``data.tokenizer_model`` (NullTokenizer with the
   recorded ``--vocab-size``), when the recorded file still exists;
3. ``LOAD/tokenizer/`` (a tokenizer.json folder), as HuggingFaceTokenizer;

else a ConfigError says what to pass. ``max_length`` is the model's ``max_position_embeddings``, capped by
the training ``--seq-length`` for trainer checkpoints.

:func:`load_hf_model` loads a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder (``config.json``,
safetensors or ``.bin`` weights, ``tokenizer.json``) the same way without writing a checkpoint: the weights
are renamed by :mod:`megalign.model.hf_weights` and the vocabulary rows are zero-padded to Megatron's
padded size exactly as ``megalign convert hf-to-megalign`` pads them at TP=1, so its logits equal those of
the converted checkpoint. Its tokenizer is the one given, else the folder's ``tokenizer.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from megalign.checkpoint.format import VOCAB_TENSORS
from megalign.checkpoint.hf_files import HFModelFolder
from megalign.checkpoint.model_record import DTYPES, TOKENIZER_DIR, checkpoint_model_config
from megalign.checkpoint.storage import Checkpoint, load_checkpoint
from megalign.config.model import ARCHITECTURES, from_hf_config
from megalign.data.tokenizers import Tokenizer, build_tokenizer, padded_vocab_size
from megalign.errors import ConfigError, DataFormatError, TokenizerError
from megalign.inference.generation import Generator, default_stop_token_ids
from megalign.inference.scoring import PerplexityScorer
from megalign.model import GPTModel, ModelConfig, ModelOptions
from megalign.model.hf_weights import hf_state_dict_to_megalign

__all__ = [
    "LoadedModel",
    "checkpoint_scorer",
    "load_hf_model",
    "load_model",
    "perplexity_function",
    "resolve_tokenizer",
]

PathLike = Union[str, Path]
Device = Union[str, torch.device]


@dataclass
class LoadedModel:
    """A model ready for inference with its tokenizer and where it came from."""

    model: GPTModel
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    step: int
    max_length: int
    tokenizer_source: str
    stop_token_ids: Tuple[int, ...]

    def generator(self, max_batch_size: int = 16, add_bos: bool = False) -> Generator:
        """A :class:`Generator` over this model (default stop ids: the tokenizer's and the HF config's EOS ids)."""
        return Generator(
            self.model,
            self.tokenizer,
            max_length=self.max_length,
            max_batch_size=max_batch_size,
            add_bos=add_bos,
            stop_token_ids=self.stop_token_ids,
        )

    def scorer(self, **options: Any) -> PerplexityScorer:
        """A :class:`PerplexityScorer` over this model (options: stride, add_bos, batch_tokens)."""
        return PerplexityScorer(self.model, self.tokenizer, max_length=self.max_length, **options)


def _recorded_tokenizer(checkpoint: Checkpoint) -> Tuple[Optional[str], Optional[str], Optional[int]]:
    """(type, model path, --vocab-size) recorded in a trainer checkpoint's config, else Nones."""
    data = checkpoint.config.get("data")
    model = checkpoint.config.get("model")
    if not isinstance(data, dict):
        return None, None, None
    vocab = model.get("vocab_size") if isinstance(model, dict) else None
    return data.get("tokenizer_type"), data.get("tokenizer_model"), vocab


def _null_vocab(checkpoint: Checkpoint, model_vocab_size: Optional[int]) -> Optional[int]:
    """NullTokenizer's --vocab-size: the recorded one, else the model's vocabulary less the eod id."""
    recorded = _recorded_tokenizer(checkpoint)[2]
    if recorded is not None:
        return recorded
    return None if model_vocab_size is None else model_vocab_size - 1


def _is_hf_tokenizer_path(path: str) -> bool:
    return path.endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json"))


def _given_tokenizer(
    tokenizer_type: Optional[str], tokenizer_model: Optional[str], null_vocab: Optional[int]
) -> Tokenizer:
    """The tokenizer named by --tokenizer-type / --tokenizer-model (a tokenizer.json path alone is enough);
    ``null_vocab`` is NullTokenizer's --vocab-size."""
    if tokenizer_type is None:
        if not _is_hf_tokenizer_path(str(tokenizer_model)):
            raise ConfigError(
                f"--tokenizer-model {tokenizer_model}: give --tokenizer-type too (only a "
                "tokenizer.json file or a folder holding one is recognised on its own)"
            )
        tokenizer_type = "HuggingFaceTokenizer"
    vocab = null_vocab if tokenizer_type == "NullTokenizer" else None
    return build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab)


def resolve_tokenizer(
    checkpoint: Checkpoint,
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    model_vocab_size: Optional[int] = None,
) -> Tuple[Tokenizer, str]:
    """The tokenizer for ``checkpoint`` and a description of where it came from (see the module doc).

    A NullTokenizer takes the recorded ``--vocab-size``, else covers the model's ``model_vocab_size`` ids
    (``--vocab-size model_vocab_size - 1``: its eod is the last id)."""
    if tokenizer_type is not None or tokenizer_model is not None:
        return _given_tokenizer(tokenizer_type, tokenizer_model, _null_vocab(checkpoint, model_vocab_size)), "given"
    recorded_type, recorded_model, _ = _recorded_tokenizer(checkpoint)
    notes: List[str] = []
    if recorded_type == "NullTokenizer":
        return build_tokenizer(
            recorded_type, None, vocab_size=_null_vocab(checkpoint, model_vocab_size)
        ), "training config"
    if recorded_type is not None and recorded_model is not None:
        if os.path.exists(recorded_model):
            return build_tokenizer(recorded_type, recorded_model), f"training config ({recorded_model})"
        notes.append(f"the training config names {recorded_type} {recorded_model}, which no longer exists")
    folder = checkpoint.path.parent / TOKENIZER_DIR
    if (folder / "tokenizer.json").is_file():
        return build_tokenizer("HuggingFaceTokenizer", str(folder)), str(folder)
    notes.append(f"{folder} holds no tokenizer.json")
    raise ConfigError(
        f"no tokenizer found for checkpoint {checkpoint.path}: {'; '.join(notes)}. Pass "
        "--tokenizer-type and --tokenizer-model (e.g. --tokenizer-type HuggingFaceTokenizer "
        "--tokenizer-model DIR_WITH_TOKENIZER_JSON)"
    )


def _max_length(checkpoint: Checkpoint, config: ModelConfig) -> int:
    model = checkpoint.config.get("model")
    seq = model.get("seq_length") if isinstance(model, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return min(seq, config.max_position_embeddings)
    return config.max_position_embeddings


def _eos_ids(hf_config: Any) -> List[int]:
    """EOS ids in a HF config.json dict (``eos_token_id``: an int or a list); none for anything else."""
    value = hf_config.get("eos_token_id") if isinstance(hf_config, dict) else None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _hf_eos_ids(checkpoint: Checkpoint) -> List[int]:
    """EOS ids in the original HF config.json of an imported checkpoint."""
    hf = checkpoint.extra.get("hf")
    return _eos_ids(hf.get("config") if isinstance(hf, dict) else None)


def _check_tokenizer_fits(tokenizer: Tokenizer, source: str, config: ModelConfig, what: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.tokenizer_type} ({source}) has {tokenizer.vocab_size} "
            f"tokens, but {what} has a vocabulary of {config.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )


def _build_model(
    config: ModelConfig, state: Dict[str, torch.Tensor], attention_backend: str, device: Device, what: str
) -> GPTModel:
    """``GPTModel(config)`` holding ``state`` (no second copy: the tensors are assigned), in eval mode on ``device``."""
    with torch.device("meta"):
        model = GPTModel(config, options=ModelOptions(attention_backend=attention_backend))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise DataFormatError(
            f"{what}: its tensors do not match the model config: {lines[1].strip() if len(lines) > 1 else exc}"
        ) from None
    return model.to(device).eval()


def _stop_ids(tokenizer: Tokenizer, eos_ids: List[int]) -> Tuple[int, ...]:
    return tuple(sorted(set(default_stop_token_ids(tokenizer)) | {i for i in eos_ids if i < tokenizer.vocab_size}))


def _read_weights(checkpoint: Checkpoint, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Model tensors, each cast to ``dtype`` as it is read (memory: the model in ``dtype`` plus one tensor)."""
    out = {}
    for name in checkpoint.tensor_names("model"):
        out[name] = checkpoint.read_tensor(name).to(dtype)
        checkpoint.close()
    return out


def load_model(
    load_dir: PathLike,
    step: Optional[int] = None,
    dtype: str = "fp32",
    device: Device = "cpu",
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    attention_backend: str = "auto",
    tokenizer: Optional[Tokenizer] = None,
) -> LoadedModel:
    """Load the checkpoint in ``load_dir`` (the latest, or ``step``) in eval mode as ``dtype`` (fp32, bf16,
    fp16) on ``device``, with its tokenizer (see the module doc).

    Raises DataFormatError for a missing or malformed checkpoint, ConfigError for a bad option or no
    tokenizer, TokenizerError when the tokenizer has more tokens than the model's vocabulary.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    checkpoint = load_checkpoint(load_dir, step)
    try:
        config = checkpoint_model_config(checkpoint)
        if tokenizer is not None:
            if tokenizer_type is not None or tokenizer_model is not None:
                raise ConfigError("load_model: give a built tokenizer or tokenizer_type/tokenizer_model, not both")
            source = "given"
        else:
            tokenizer, source = resolve_tokenizer(checkpoint, tokenizer_type, tokenizer_model, config.vocab_size)
        _check_tokenizer_fits(tokenizer, source, config, f"checkpoint {checkpoint.path}")
        model = _build_model(
            config, _read_weights(checkpoint, DTYPES[dtype]), attention_backend, device, str(checkpoint.path)
        )
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            config=config,
            path=checkpoint.path,
            step=checkpoint.step,
            max_length=_max_length(checkpoint, config),
            tokenizer_source=source,
            stop_token_ids=_stop_ids(tokenizer, _hf_eos_ids(checkpoint)),
        )
    finally:
        checkpoint.close()


class _LazyHFState(Mapping[str, torch.Tensor]):
    """A HF folder's tensors by HF name, each read (and cast to ``dtype``) only when looked up."""

    def __init__(self, folder: HFModelFolder, dtype: torch.dtype) -> None:
        self.folder, self.dtype, self._names = folder, dtype, set(folder.names())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:
            return self.folder.read(name).to(self.dtype)
        finally:
            self.folder.release_maps()  # keep only the tensors read so far, not the mapped files

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self.folder.names())

    def __len__(self) -> int:
        return len(self._names)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (as the converter pads the vocabulary)."""
    if tensor.shape[0] >= rows:
        return tensor
    out = torch.zeros((rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    out[: tensor.shape[0]] = tensor
    return out


def load_hf_model(
    hf_dir: PathLike,
    dtype: str = "fp32",
    device: Device = "cpu",
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    attention_backend: str = "auto",
    tokenizer: Optional[Tokenizer] = None,
    make_vocab_size_divisible_by: int = 128,
) -> LoadedModel:
    """Load the Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder ``hf_dir`` in eval mode as ``dtype``
    on ``device``, with its tokenizer (see the module doc); ``step`` is 0, like a converted checkpoint's.

    Raises ConfigError for a missing folder, an unsupported architecture or config, or no tokenizer;
    DataFormatError naming the file for a missing/malformed config.json or missing, unexpected or
    misshapen weights; TokenizerError when the tokenizer has more tokens than the model's vocabulary.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    folder = HFModelFolder(hf_dir)
    try:
        architectures = folder.config.get("architectures") or []
        architecture = architectures[0] if isinstance(architectures, list) and architectures else None
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"--hf-dir {folder.path}: {folder.path / 'config.json'} names architecture "
                f"{architecture!r}, which is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        hf_config = from_hf_config(folder.config)
        config = dataclasses.replace(
            hf_config,
            vocab_size=padded_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by),
            true_vocab_size=hf_config.vocab_size,
        )
        if tokenizer is not None:
            if tokenizer_type is not None or tokenizer_model is not None:
                raise ConfigError("load_hf_model: give a built tokenizer or tokenizer_type/tokenizer_model, not both")
            source = "given"
        elif tokenizer_type is not None or tokenizer_model is not None:
            tokenizer, source = _given_tokenizer(tokenizer_type, tokenizer_model, config.vocab_size - 1), "given"
        elif (folder.path / "tokenizer.json").is_file():
            tokenizer, source = build_tokenizer("HuggingFaceTokenizer", str(folder.path)), str(folder.path)
        else:
            raise ConfigError(
                f"--hf-dir {folder.path}: holds no tokenizer.json; pass --tokenizer-type and "
                "--tokenizer-model (e.g. --tokenizer-type HuggingFaceTokenizer --tokenizer-model "
                "DIR_WITH_TOKENIZER_JSON)"
            )
        _check_tokenizer_fits(tokenizer, source, config, f"--hf-dir {folder.path}")
        try:
            state = hf_state_dict_to_megalign(_LazyHFState(folder, DTYPES[dtype]), hf_config)
        except DataFormatError as exc:
            raise DataFormatError(f"--hf-dir {folder.path}: {exc}") from None
        for name in VOCAB_TENSORS:  # rows padded to the padded vocabulary
            if name in state:
                state[name] = _pad_rows(state[name], config.vocab_size)
        model = _build_model(config, state, attention_backend, device, f"--hf-dir {folder.path}")
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            config=config,
            path=folder.path,
            step=0,
            max_length=config.max_position_embeddings,
            tokenizer_source=source,
            stop_token_ids=_stop_ids(tokenizer, _eos_ids(folder.config)),
        )
    finally:
        folder.close()


def perplexity_function(loaded: LoadedModel, batch_size: int = 8) -> Callable[[List[str]], List[float]]:
    """A function ``texts -> perplexities`` over ``loaded``, running up to ``batch_size`` full-length windows
    per forward pass. A document with no predicted token (fewer than two) scores ``nan``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r} must be a positive integer")
    scorer = loaded.scorer(batch_tokens=batch_size * loaded.max_length)

    def score(texts: List[str]) -> List[float]:
        return [math.nan if s.ppl is None else s.ppl for s in scorer.score(texts)]

    return score


def checkpoint_scorer(
    load: str,
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    batch_size: int = 8,
    dtype: str = "fp32",
    device: Device = "cpu",
    step: Optional[int] = None,
) -> Callable[[List[str]], List[float]]:
    """:func:`perplexity_function` over the checkpoint in ``load`` (its latest step, or ``step``; tokenizer
    resolved as :func:`load_model` does), loaded as ``dtype`` on ``device``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r} must be a positive integer")
    loaded = load_model(
        load, step, dtype=dtype, device=device, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model
    )
    return perplexity_function(loaded, batch_size)
