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
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from megalign.convert.hf_to_megalign import TOKENIZER_DIR
from megalign.convert.megalign_to_hf import DTYPES, checkpoint_model_config
from megalign.data.tokenizers import Tokenizer, build_tokenizer
from megalign.errors import ConfigError, DataFormatError, TokenizerError
from megalign.inference.generation import Generator, default_stop_token_ids
from megalign.inference.scoring import PerplexityScorer
from megalign.model import GPTModel, ModelConfig, ModelOptions
from megalign.training.checkpointing import Checkpoint, load_checkpoint

__all__ = ["LoadedModel", "load_model", "resolve_tokenizer"]

PathLike = Union[str, Path]


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
        return Generator(self.model, self.tokenizer, max_length=self.max_length, max_batch_size=max_batch_size,
                         add_bos=add_bos, stop_token_ids=self.stop_token_ids)

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


def resolve_tokenizer(checkpoint: Checkpoint, tokenizer_type: Optional[str] = None,
                      tokenizer_model: Optional[str] = None, model_vocab_size: Optional[int] = None
                      ) -> Tuple[Tokenizer, str]:
    """The tokenizer for ``checkpoint`` and a description of where it came from (see the module doc).

    A NullTokenizer takes the recorded ``--vocab-size``, else covers the model's ``model_vocab_size`` ids
    (``--vocab-size model_vocab_size - 1``: its eod is the last id)."""
    if tokenizer_type is not None or tokenizer_model is not None:
        if tokenizer_type is None:
            if not _is_hf_tokenizer_path(str(tokenizer_model)):
                raise ConfigError(f"--tokenizer-model {tokenizer_model}: give --tokenizer-type too (only a "
                                  "tokenizer.json file or a folder holding one is recognised on its own)")
            tokenizer_type = "HuggingFaceTokenizer"
        vocab = _null_vocab(checkpoint, model_vocab_size) if tokenizer_type == "NullTokenizer" else None
        return build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab), "given"
    recorded_type, recorded_model, _ = _recorded_tokenizer(checkpoint)
    notes: List[str] = []
    if recorded_type == "NullTokenizer":
        return build_tokenizer(recorded_type, None, vocab_size=_null_vocab(checkpoint, model_vocab_size)), \
            "training config"
    if recorded_type is not None and recorded_model is not None:
        if os.path.exists(recorded_model):
            return build_tokenizer(recorded_type, recorded_model), f"training config ({recorded_model})"
        notes.append(f"the training config names {recorded_type} {recorded_model}, which no longer exists")
    folder = checkpoint.path.parent / TOKENIZER_DIR
    if (folder / "tokenizer.json").is_file():
        return build_tokenizer("HuggingFaceTokenizer", str(folder)), str(folder)
    notes.append(f"{folder} holds no tokenizer.json")
    raise ConfigError(f"no tokenizer found for checkpoint {checkpoint.path}: {'; '.join(notes)}. Pass "
                      "--tokenizer-type and --tokenizer-model (e.g. --tokenizer-type HuggingFaceTokenizer "
                      "--tokenizer-model DIR_WITH_TOKENIZER_JSON)")


def _max_length(checkpoint: Checkpoint, config: ModelConfig) -> int:
    model = checkpoint.config.get("model")
    seq = model.get("seq_length") if isinstance(model, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return min(seq, config.max_position_embeddings)
    return config.max_position_embeddings


def _hf_eos_ids(checkpoint: Checkpoint) -> List[int]:
    """EOS ids in the original HF config.json of an imported checkpoint (an int or a list)."""
    hf = checkpoint.extra.get("hf")
    original = hf.get("config") if isinstance(hf, dict) else None
    value = original.get("eos_token_id") if isinstance(original, dict) else None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _read_weights(checkpoint: Checkpoint, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Model tensors, each cast to ``dtype`` as it is read (memory: the model in ``dtype`` plus one tensor)."""
    out = {}
    for name in checkpoint.tensor_names("model"):
        out[name] = checkpoint.read_tensor(name).to(dtype)
        checkpoint.close()
    return out


def load_model(load_dir: PathLike, step: Optional[int] = None, dtype: str = "fp32", device: Union[str, torch.device] = "cpu",
               tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None,
               attention_backend: str = "auto", tokenizer: Optional[Tokenizer] = None) -> LoadedModel:
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
        if tokenizer.vocab_size > config.vocab_size:
            raise TokenizerError(f"tokenizer {tokenizer.tokenizer_type} ({source}) has {tokenizer.vocab_size} "
                                 f"tokens, but checkpoint {checkpoint.path} has a vocabulary of {config.vocab_size}; "
                                 "pass the tokenizer the model was trained with")
        with torch.device("meta"):
            model = GPTModel(config, options=ModelOptions(attention_backend=attention_backend))
        state = _read_weights(checkpoint, DTYPES[dtype])
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise DataFormatError(f"{checkpoint.path}: its tensors do not match the model config: "
                                  f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
                                  ) from None
        model = model.to(device).eval()
        stops = tuple(sorted(set(default_stop_token_ids(tokenizer))
                             | {i for i in _hf_eos_ids(checkpoint) if i < tokenizer.vocab_size}))
        return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=checkpoint.path,
                           step=checkpoint.step, max_length=_max_length(checkpoint, config),
                           tokenizer_source=source, stop_token_ids=stops)
    finally:
        checkpoint.close()
