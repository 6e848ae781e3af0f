"""Tokenizers: one small interface over SentencePiece, Hugging Face `tokenizers`, tiktoken, GPT-2's byte-level BPE
(a vocab.json and a merges.txt) and a null tokenizer.

Types are named as in Megatron-LM's --tokenizer-type (see TOKENIZER_TYPES and docs/tokenizers.md):

    tokenizer = build_tokenizer("HuggingFaceTokenizer", "path/to/folder_with_tokenizer.json")
    ids = tokenizer.encode("مرحبا بالعالم")
    text = tokenizer.decode(ids)

A tokenizer is rebuilt from (type, model path) alone, so worker processes build their own copy
(pickling one sends just those arguments). Model files are read as their own formats, never pickled.
`encode` never adds bos/eos; callers append `eod` between documents (Megatron's --append-eod).
"""

from __future__ import annotations

import abc
import base64
import binascii
import difflib
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megalign.config.sections import TOKENIZER_TYPES
from megalign.errors import ConfigError, TokenizerError

logger = logging.getLogger(__name__)

SENTENCEPIECE_TYPES: Tuple[str, ...] = TOKENIZER_TYPES[:3]

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
#: Special tokens megalign's trained SentencePiece / Hugging Face tokenizers carry (ids in this order
#: for hf-bpe; SentencePiece puts <unk> first and keeps bos/eos/pad as control pieces).
TRAINED_SPECIAL_TOKENS: Tuple[str, ...] = (BEGIN_OF_TEXT, END_OF_TEXT, PAD, START_HEADER, END_HEADER, END_OF_TURN)
CHAT_ROLES: Tuple[str, ...] = ("system", "user", "assistant")

#: The Llama-3 (and cl100k) pre-tokenization regex: TikTokenizer's pattern and hf-bpe's Split rule.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Llama-3.1's 256 special tokens, appended after the ranks of a .tiktoken file.
LLAMA3_SPECIAL_TOKENS: Tuple[str, ...] = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    "<|eom_id|>",
    END_OF_TURN,
    "<|python_tag|>",
) + tuple(f"<|reserved_special_token_{i}|>" for i in range(3, 248))

# Megatron's TikTokenizer JSON vocabulary: 1000 special ids first (these 7, then fillers), ranks shifted.
_MEGATRON_TIKTOKEN_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
_MEGATRON_TIKTOKEN_NUM_SPECIAL = 1000
_MEGATRON_TIKTOKEN_MAX_VOCAB = 2**17
_MEGATRON_TIKTOKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Jinja form of the fixed chat template (written into trained hf-bpe tokenizer_config.json files).
LLAMA3_CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Names recognised as bos/eos/pad when a bare tokenizer.json comes without a tokenizer_config.json.
_BOS_NAMES = (BEGIN_OF_TEXT, "<s>", "<|startoftext|>", "<bos>", "[BOS]")
_EOS_NAMES = (END_OF_TEXT, "</s>", "<|endoftext|>", "<eos>", "[EOS]", "<|im_end|>")
_PAD_NAMES = (PAD, "<pad>", "<|finetune_right_pad_id|>", "[PAD]")


def _batch_threads() -> int:
    """Threads for a batched encode: the CPUs this process may use, at most 8."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    return max(1, min(8, available))


def _read_model_file(path: str, tokenizer_type: str, what: str) -> bytes:
    """Read a tokenizer file, turning every OS problem into a TokenizerError that names it."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TokenizerError(f"{tokenizer_type}: {what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise TokenizerError(f"{tokenizer_type}: {what} '{path}' is a directory, expected a file") from None
    except OSError as error:
        raise TokenizerError(f"{tokenizer_type}: cannot read {what} '{path}': {error.strerror or error}") from None


def validate_chat_messages(messages: Sequence[dict]) -> None:
    """Check that `messages` is a list of {"role": system|user|assistant, "content": str} dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"chat message {index} must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise TokenizerError(f"chat message {index}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise TokenizerError(f"chat message {index}: 'content' must be a string, got {type(content).__name__}")


def render_chat(
    messages: Sequence[dict],
    *,
    bos_text: str = "",
    end_of_turn: str = END_OF_TURN,
    add_generation_prompt: bool = False,
) -> str:
    """The fixed Llama-3 chat layout (contents are stripped, as Llama-3's template does):

    {bos}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}{end_of_turn} ... then, with
    add_generation_prompt, <|start_header_id|>assistant<|end_header_id|>\\n\\n
    """
    validate_chat_messages(messages)
    parts = [bos_text]
    for message in messages:
        parts.append(f"{START_HEADER}{message['role']}{END_HEADER}\n\n{message['content'].strip()}{end_of_turn}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


class Tokenizer(abc.ABC):
    """A text tokenizer: encode/decode, special ids, chat template, and a JSON description.

    Attributes: vocab_size (the tokenizer's own size, before padding), eod (end-of-document id, =
    eos where there is one), bos/eos/pad (ids or None), tokenizer_type and model_path (what
    build_tokenizer was given), special_tokens (strings that `encode` turns into one special id).
    """

    vocab_size: int
    eod: int
    bos: Optional[int] = None
    eos: Optional[int] = None
    pad: Optional[int] = None

    def __init__(self, tokenizer_type: str, model_path: Optional[str]) -> None:
        self.tokenizer_type = tokenizer_type
        self.model_path = model_path
        self.special_tokens: Dict[str, int] = {}
        self._digest: Optional["hashlib._Hash"] = None

    def _read_defining_file(self, path: str, what: str) -> bytes:
        """Read a file that defines this tokenizer, adding its name and bytes to describe()'s sha256."""
        data = _read_model_file(path, self.tokenizer_type, what)
        if self._digest is None:
            self._digest = hashlib.sha256()
        self._digest.update(os.path.basename(path).encode() + b"\0" + len(data).to_bytes(8, "little"))
        self._digest.update(data)
        return data

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of `text` (no bos/eos added)."""

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of many texts; equal to [encode(t) for t in texts], multithreaded where possible."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def _decode(self, ids: List[int]) -> str:
        """Decode ids already checked to be in range."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens are kept as their text where they have one)."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise TokenizerError(
                f"{self.tokenizer_type}: token id {bad} is outside the vocabulary (size {self.vocab_size}); "
                "were these ids made with another tokenizer?"
            )
        return self._decode(ids)

    def _end_of_turn_text(self) -> str:
        """<|eot_id|> when it is one token, else the eos token's text, else a newline."""
        if END_OF_TURN in self.special_tokens:
            return END_OF_TURN
        return self._text_of(self.eos) or "\n"

    def _text_of(self, token_id: Optional[int]) -> str:
        """The string that encodes to exactly `token_id`, or '' when there is none."""
        if token_id is None:
            return ""
        return next((text for text, value in self.special_tokens.items() if value == token_id), "")

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render a conversation with the fixed Llama-3 layout (see render_chat and docs/tokenizers.md)."""
        return render_chat(
            messages,
            bos_text=self._text_of(self.bos),
            end_of_turn=self._end_of_turn_text(),
            add_generation_prompt=add_generation_prompt,
        )

    def describe(self) -> dict:
        """JSON-able identity: type, model path, sha256 of the files as loaded, vocab size, special ids."""
        return {
            "type": self.tokenizer_type,
            "model": self.model_path,
            "sha256": self._digest.hexdigest() if self._digest is not None else None,
            "vocab_size": self.vocab_size,
            "bos": self.bos,
            "eos": self.eos,
            "eod": self.eod,
            "pad": self.pad,
        }

    def _rebuild_args(self) -> tuple:
        return (self.tokenizer_type, self.model_path)

    def __reduce__(self):
        """Pickling (e.g. to a worker process) sends only the build arguments; the worker reloads."""
        return (_rebuild, self._rebuild_args())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(type={self.tokenizer_type!r}, model={self.model_path!r}, "
            f"vocab_size={self.vocab_size})"
        )


def _rebuild(
    tokenizer_type: str,
    model: Optional[str],
    vocab_size: Optional[int] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
) -> Tokenizer:
    return build_tokenizer(tokenizer_type, model, vocab_size=vocab_size, vocab_file=vocab_file, merge_file=merge_file)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model (SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer).

    bos/eos/pad come from the model; eod = eos. As in Megatron, text is encoded as plain text:
    control pieces (bos/eos/pad) are never produced from their spelling, user-defined pieces are.
    """

    def __init__(self, tokenizer_type: str, model_path: str) -> None:
        super().__init__(tokenizer_type, model_path)
        import sentencepiece

        data = self._read_defining_file(model_path, "SentencePiece model")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except Exception as error:  # RuntimeError / OSError from the C++ parser
            raise TokenizerError(
                f"{tokenizer_type}: '{model_path}' is not a SentencePiece model ({error}); pass the "
                "tokenizer.model file, or choose --tokenizer-type HuggingFaceTokenizer / TikTokenizer"
            ) from None
        self._sp = processor
        self.vocab_size = processor.get_piece_size()
        self.bos, self.eos, self.pad = (
            self._optional_id(processor.bos_id()),
            self._optional_id(processor.eos_id()),
            self._optional_id(processor.pad_id()),
        )
        if self.eos is None:
            raise TokenizerError(
                f"{tokenizer_type}: '{model_path}' has no end-of-sentence piece (eos_id=-1), which "
                "megalign uses as end-of-document; retrain it with eos_id set"
            )
        self.eod = self.eos
        unk = processor.unk_id()
        for text in TRAINED_SPECIAL_TOKENS:  # user-defined pieces are matched in text by SentencePiece
            piece_id = processor.piece_to_id(text)
            if piece_id != unk and not processor.is_control(piece_id) and piece_id in processor.encode(text):
                self.special_tokens[text] = piece_id

    def _optional_id(self, value: int) -> Optional[int]:
        return value if 0 <= value < self.vocab_size else None

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if not texts:
            return []
        return self._sp.encode(list(texts), num_threads=_batch_threads())

    def _decode(self, ids: List[int]) -> str:
        return self._sp.decode(ids)


class _TokenizersLibraryTokenizer(Tokenizer):
    """A tokenizer held as a `tokenizers` library ``Tokenizer`` in ``self._tok`` (special tokens kept as text)."""

    _tok: Any

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [encoding.ids for encoding in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class HuggingFaceTokenizer(_TokenizersLibraryTokenizer):
    """A Hugging Face fast tokenizer: tokenizer.json (a file, or a folder holding one), loaded with `tokenizers`.

    bos/eos/pad come from tokenizer_config.json (else special_tokens_map.json) next to tokenizer.json,
    else from well-known special-token names; eod = eos. Added tokens in text become their ids.
    """

    CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, tokenizer_type: str, model_path: str) -> None:
        super().__init__(tokenizer_type, model_path)
        from tokenizers import Tokenizer as HFTokenizer

        if os.path.isdir(model_path):
            json_path = os.path.join(model_path, "tokenizer.json")
            if not os.path.isfile(json_path):
                raise TokenizerError(
                    f"{tokenizer_type}: folder '{model_path}' has no tokenizer.json (megalign reads Hugging "
                    "Face fast-tokenizer files; transformers' tokenizer.save_pretrained(folder) writes one)"
                )
        elif not os.path.exists(model_path) and model_path.count("/") == 1 and not model_path.endswith(".json"):
            raise TokenizerError(
                f"{tokenizer_type}: '{model_path}' is not a local file or folder; megalign loads tokenizers "
                "from local paths only (download it first, e.g. huggingface-cli download NAME --local-dir DIR)"
            )
        else:
            json_path = model_path
        data = self._read_defining_file(json_path, "tokenizer file")
        try:
            self._tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as error:  # JSON or schema errors from the Rust side
            raise TokenizerError(
                f"{tokenizer_type}: '{json_path}' is not a Hugging Face tokenizer.json ({str(error)[:200]})"
            ) from None
        self._json_path = json_path
        folder = os.path.dirname(os.path.abspath(json_path))
        self._config_paths = [
            os.path.join(folder, name) for name in self.CONFIG_FILES if os.path.isfile(os.path.join(folder, name))
        ]
        config = self._load_config()
        self.chat_template: Optional[str] = self._pick_chat_template(config.get("chat_template"))
        self._compiled_template: Optional[Tuple[str, Any]] = None  # (source, jinja2 Template) once used

        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special_tokens = {
            added.content: token_id for token_id, added in self._tok.get_added_tokens_decoder().items() if added.special
        }
        self.bos = self._resolve_special(config, "bos_token", _BOS_NAMES)
        self.eos = self._resolve_special(config, "eos_token", _EOS_NAMES)
        self.pad = self._resolve_special(config, "pad_token", _PAD_NAMES)
        if self.eos is None:
            raise TokenizerError(
                f"{tokenizer_type}: '{model_path}' defines no end-of-sequence token, which megalign uses as "
                'end-of-document; add "eos_token" to tokenizer_config.json next to tokenizer.json'
            )
        self.eod = self.eos

    def _load_config(self) -> dict:
        """tokenizer_config.json values, completed by special_tokens_map.json."""
        merged: dict = {}
        for path in self._config_paths:
            try:
                values = json.loads(self._read_defining_file(path, "tokenizer config"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{self.tokenizer_type}: '{path}' is not valid JSON ({error})") from None
            if not isinstance(values, dict):
                raise TokenizerError(f"{self.tokenizer_type}: '{path}' must hold a JSON object")
            for key, value in values.items():
                merged.setdefault(key, value)
        return merged

    @staticmethod
    def _pick_chat_template(value: object) -> Optional[str]:
        """A chat_template string, or the 'default' one of a list of named templates."""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
            template = named.get("default")
            return template if isinstance(template, str) else None
        return None

    def _resolve_special(self, config: dict, key: str, fallback_names: Sequence[str]) -> Optional[int]:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            token_id = self._tok.token_to_id(value)
            if token_id is None:
                raise TokenizerError(
                    f"{self.tokenizer_type}: {key} '{value}' from {', '.join(self._config_paths)} is not in "
                    f"the vocabulary of '{self._json_path}'"
                )
            return token_id
        if key in config:  # explicitly null
            return None
        return next((self.special_tokens[name] for name in fallback_names if name in self.special_tokens), None)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The tokenizer's own Jinja chat_template when it has one (and jinja2 is installed), else the fixed one."""
        if self.chat_template is None:
            return super().apply_chat_template(messages, add_generation_prompt)
        validate_chat_messages(messages)
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            logger.warning(
                "jinja2 is not installed: using megalign's fixed chat template instead of %s's", self.model_path
            )
            return super().apply_chat_template(messages, add_generation_prompt)

        try:
            # compiling costs ~3 ms, rendering a compiled template ~0.02 ms: compile once per template text
            if self._compiled_template is None or self._compiled_template[0] != self.chat_template:
                environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                environment.globals["raise_exception"] = self._raise_template_error
                self._compiled_template = (self.chat_template, environment.from_string(self.chat_template))
            return self._compiled_template[1].render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._text_of(self.bos),
                eos_token=self._text_of(self.eos),
                pad_token=self._text_of(self.pad),
            )
        except TemplateError as error:
            raise TokenizerError(f"chat template of '{self.model_path}' failed: {error}") from None

    def _raise_template_error(self, message: str) -> None:
        """``raise_exception`` inside chat templates."""
        raise TokenizerError(f"chat template of '{self.model_path}': {message}")

    def _text_of(self, token_id: Optional[int]) -> str:
        if token_id is None:
            return ""
        return self._tok.id_to_token(token_id) or ""


class TikTokenizer(Tokenizer):
    """tiktoken BPE: a `.tiktoken` file ("base64(token bytes) rank" per line, as Llama-3's tokenizer.model)
    with Llama-3.1's 256 special tokens appended after the ranks and the Llama-3 regex; or Megatron's
    TikTokenizer JSON vocabulary (a .json file: 1000 special ids first, ranks shifted, Megatron's v2 regex).
    """

    def __init__(self, tokenizer_type: str, model_path: str) -> None:
        super().__init__(tokenizer_type, model_path)
        import tiktoken

        data = self._read_defining_file(model_path, "tiktoken file")
        if model_path.lower().endswith(".json"):
            ranks, specials, pattern = self._parse_megatron_json(data)
            self.bos, self.eos, self.pad = specials["<s>"], specials["</s>"], specials["<pad>"]
        else:
            ranks = self._parse_tiktoken(data)
            first_special = max(ranks.values()) + 1
            specials = {text: first_special + i for i, text in enumerate(LLAMA3_SPECIAL_TOKENS)}
            pattern = LLAMA3_PATTERN
            self.bos, self.eos = specials[BEGIN_OF_TEXT], specials[END_OF_TEXT]
            self.pad = specials["<|finetune_right_pad_id|>"]
        missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
        if missing:
            raise TokenizerError(
                f"{tokenizer_type}: '{model_path}' lacks ranks for {len(missing)} single bytes (e.g. "
                f"{missing[0]:#04x}); every byte needs a rank so that any text can be encoded"
            )
        self.special_tokens = specials
        self.eod = self.eos
        self.vocab_size = max(max(ranks.values()), max(specials.values())) + 1
        self._encoding = tiktoken.Encoding(
            name=f"megalign:{os.path.basename(model_path)}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )

    def _parse_tiktoken(self, data: bytes) -> Dict[bytes, int]:
        ranks: Dict[bytes, int] = {}
        seen_ranks = set()
        for line_number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if rank < 0:
                    raise ValueError("negative rank")
            except (ValueError, binascii.Error):
                raise TokenizerError(
                    f"{self.tokenizer_type}: {self.model_path}:{line_number}: not a tiktoken line (expected "
                    "'base64(token bytes) rank'); is this really a .tiktoken file?"
                ) from None
            if token in ranks or rank in seen_ranks:
                raise TokenizerError(
                    f"{self.tokenizer_type}: {self.model_path}:{line_number}: duplicate token or rank {rank}"
                )
            ranks[token] = rank
            seen_ranks.add(rank)
        if not ranks:
            raise TokenizerError(f"{self.tokenizer_type}: '{self.model_path}' holds no ranks")
        return ranks

    def _parse_megatron_json(self, data: bytes) -> Tuple[Dict[bytes, int], Dict[str, int], str]:
        shift = _MEGATRON_TIKTOKEN_NUM_SPECIAL
        try:
            entries = json.loads(data)
            entries = entries[: _MEGATRON_TIKTOKEN_MAX_VOCAB - shift]
            ranks = {
                base64.b64decode(item["token_bytes"], validate=True): int(item["rank"]) + shift for item in entries
            }
        except (ValueError, TypeError, KeyError, binascii.Error) as error:
            raise TokenizerError(
                f"{self.tokenizer_type}: '{self.model_path}' is not a Megatron tiktoken JSON vocabulary (a "
                f"list of {{rank, token_bytes, token_str}}): {error}"
            ) from None
        if len(ranks) != len(entries) or set(ranks.values()) != set(range(shift, shift + len(entries))):
            raise TokenizerError(f"{self.tokenizer_type}: '{self.model_path}' has duplicate or missing ranks")
        fillers = [f"<SPECIAL_{i}>" for i in range(len(_MEGATRON_TIKTOKEN_SPECIALS), shift)]
        specials = {text: i for i, text in enumerate(_MEGATRON_TIKTOKEN_SPECIALS + tuple(fillers))}
        return ranks, specials, _MEGATRON_TIKTOKEN_PATTERN

    def encode(self, text: str) -> List[int]:
        return self._encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._encoding.encode_batch(list(texts), num_threads=_batch_threads(), allowed_special="all")

    def _decode(self, ids: List[int]) -> str:
        return self._encoding.decode(ids)


class GPT2BPETokenizer(_TokenizersLibraryTokenizer):
    """Megatron's GPT2BPETokenizer: GPT-2's byte-level BPE from a ``vocab.json`` (token -> id) and a
    ``merges.txt`` (one merge "a b" a line, after an optional ``#version`` line), as --vocab-file and
    --merge-file give them; ``<|endoftext|>`` is the end-of-document token and encodes as one id."""

    END_OF_TEXT = "<|endoftext|>"

    def __init__(self, tokenizer_type: str, vocab_file: str, merge_file: str) -> None:
        super().__init__(tokenizer_type, vocab_file)
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        self.vocab_file, self.merge_file = vocab_file, merge_file
        try:
            vocab = json.loads(self._read_defining_file(vocab_file, "vocab file (--vocab-file)"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{tokenizer_type}: vocab file '{vocab_file}' is not valid JSON ({error})") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
            raise TokenizerError(
                f"{tokenizer_type}: vocab file '{vocab_file}' must be a JSON object of token -> id (GPT-2's vocab.json)"
            )
        merges = self._parse_merges(self._read_defining_file(merge_file, "merge file (--merge-file)"))
        missing = sorted({part for pair in merges for part in pair if part not in vocab})
        if missing:
            raise TokenizerError(
                f"{tokenizer_type}: merge file '{merge_file}' uses {len(missing)} piece(s) that vocab file "
                f"'{vocab_file}' lacks (e.g. {missing[0]!r}); are these files from the same tokenizer?"
            )
        if self.END_OF_TEXT not in vocab:
            raise TokenizerError(
                f"{tokenizer_type}: vocab file '{vocab_file}' has no {self.END_OF_TEXT} token, which GPT-2 "
                "tokenizers use as end-of-document"
            )
        self._tok = HFTokenizer(models.BPE(vocab, merges))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._tok.add_special_tokens([AddedToken(self.END_OF_TEXT, special=True)])
        self.vocab_size = max(vocab.values()) + 1
        self.eod = self.eos = vocab[self.END_OF_TEXT]
        self.special_tokens = {self.END_OF_TEXT: self.eod}

    def _parse_merges(self, data: bytes) -> List[Tuple[str, str]]:
        merges: List[Tuple[str, str]] = []
        for number, line in enumerate(data.decode("utf-8", errors="strict").splitlines(), start=1):
            if not line.strip() or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(
                    f"{self.tokenizer_type}: {self.merge_file}:{number}: expected two pieces separated by one "
                    f"space (GPT-2's merges.txt), got {line[:60]!r}"
                )
            merges.append((parts[0], parts[1]))
        return merges

    def describe(self) -> dict:
        return {**super().describe(), "merge_file": self.merge_file}

    def _rebuild_args(self) -> tuple:
        return (self.tokenizer_type, None, None, self.vocab_file, self.merge_file)


def _gpt2_files(model: Optional[str], vocab_file: Optional[str], merge_file: Optional[str]) -> Tuple[str, str]:
    """--vocab-file and --merge-file, or ``vocab.json`` and ``merges.txt`` in the folder --tokenizer-model names."""
    if model and os.path.isdir(model) and vocab_file is None and merge_file is None:
        vocab_file, merge_file = os.path.join(model, "vocab.json"), os.path.join(model, "merges.txt")
    elif model:
        raise TokenizerError(
            "GPT2BPETokenizer takes --vocab-file and --merge-file (or --tokenizer-model naming a folder that "
            f"holds vocab.json and merges.txt), not --tokenizer-model '{model}' with them"
        )
    if vocab_file is None or merge_file is None:
        raise TokenizerError(
            "GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt), or --tokenizer-model "
            "naming a folder that holds both"
        )
    return os.fspath(vocab_file), os.fspath(merge_file)


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is whitespace-separated integer ids; eod = the given vocab size.

    build_tokenizer("NullTokenizer", vocab_size=V) has ids 0..V-1 plus eod = V, so vocab_size = V + 1.
    """

    def __init__(self, tokenizer_type: str, vocab_size: int) -> None:
        super().__init__(tokenizer_type, None)
        self._given_vocab_size = int(vocab_size)
        self.vocab_size = self._given_vocab_size + 1
        self.eod = self._given_vocab_size

    def encode(self, text: str) -> List[int]:
        ids = []
        for token in text.split():
            try:
                ids.append(int(token))
            except ValueError:
                raise TokenizerError(
                    f"NullTokenizer: text must be whitespace-separated integer ids, found {token[:40]!r}"
                ) from None
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise TokenizerError(
                f"NullTokenizer: id {bad} is outside 0..{self.vocab_size - 1} (--vocab-size {self._given_vocab_size})"
            )
        return ids

    def _decode(self, ids: List[int]) -> str:
        return " ".join(str(i) for i in ids)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = False) -> str:
        raise TokenizerError("NullTokenizer has no text vocabulary, so it cannot render chat templates")

    def describe(self) -> dict:
        return {**super().describe(), "given_vocab_size": self._given_vocab_size}

    def _rebuild_args(self) -> tuple:
        return (self.tokenizer_type, None, self._given_vocab_size)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    *,
    vocab_size: Optional[int] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
) -> Tokenizer:
    """Load a tokenizer by Megatron type name (TOKENIZER_TYPES) from a local model path.

    `vocab_size` is only for NullTokenizer (Megatron's --vocab-size): ids 0..vocab_size-1, eod = vocab_size.
    `vocab_file` / `merge_file` only for GPT2BPETokenizer (or a `tokenizer_model` folder holding vocab.json and
    merges.txt).
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        close = difflib.get_close_matches(str(tokenizer_type), TOKENIZER_TYPES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TokenizerError(
            f"unknown tokenizer type '{tokenizer_type}'{hint}; valid types: {', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_type != "GPT2BPETokenizer" and (vocab_file is not None or merge_file is not None):
        raise TokenizerError(f"--vocab-file and --merge-file are for GPT2BPETokenizer, not {tokenizer_type}")
    if tokenizer_type == "NullTokenizer":
        if tokenizer_model:
            raise TokenizerError("NullTokenizer takes no model file; give --vocab-size instead")
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError("NullTokenizer needs a positive vocab_size (--vocab-size); its eod id is vocab_size")
        return NullTokenizer(tokenizer_type, int(vocab_size))
    if tokenizer_type == "GPT2BPETokenizer":
        if vocab_size is not None:
            raise TokenizerError(
                "vocab_size is only for NullTokenizer; GPT2BPETokenizer takes its vocabulary from --vocab-file"
            )
        return GPT2BPETokenizer(tokenizer_type, *_gpt2_files(tokenizer_model, vocab_file, merge_file))
    if vocab_size is not None:
        raise TokenizerError(
            f"vocab_size is only for NullTokenizer; {tokenizer_type} takes its vocabulary from '{tokenizer_model}'"
        )
    if not tokenizer_model:
        raise TokenizerError(f"{tokenizer_type} needs a model path (--tokenizer-model)")
    model = os.fspath(tokenizer_model)
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(tokenizer_type, model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_type, model)
    return TikTokenizer(tokenizer_type, model)


def padded_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Megatron's rule: round vocab_size up to a multiple of make_vocab_size_divisible_by * TP size."""
    for name, value in (
        ("vocab_size", vocab_size),
        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by),
        ("tensor_model_parallel_size", tensor_model_parallel_size),
    ):
        if int(value) != value or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    return -(-int(vocab_size) // multiple) * multiple
