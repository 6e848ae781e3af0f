"""Train a tokenizer on JSONL text: SentencePiece, Hugging Face byte-level BPE, or tiktoken ranks.

Reads the --json-keys fields of JSONL files (plain, .gz, .zst; globs and folders allowed) and writes,
into --output-dir:
  sentencepiece  tokenizer.model   (use with --tokenizer-type GPTSentencePieceTokenizer)
  hf-bpe         tokenizer.json + tokenizer_config.json   (--tokenizer-type HuggingFaceTokenizer, the folder)
  tiktoken       tokenizer.tiktoken   (--tokenizer-type TikTokenizer)
plus tokenizer_training.json (what it was trained on). Every kind handles Arabic: SentencePiece keeps
characters at 99.99% coverage with byte fallback; the BPE kinds work on bytes. Special tokens follow
Llama-3: <|begin_of_text|>, <|end_of_text|>, a pad token and the chat-role tokens (docs/tokenizers.md).
Training is deterministic for the same inputs and seed; files appear atomically when it finishes.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

from megalign.data.jsonl import expand_inputs, iter_records
from megalign.data.tokenizers import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    END_OF_TURN,
    LLAMA3_CHAT_TEMPLATE_JINJA,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    PAD,
    START_HEADER,
    TRAINED_SPECIAL_TOKENS,
    build_tokenizer,
)
from megalign.errors import ConfigError, DataFormatError
from megalign.utils.atomic import write_json_atomic
from megalign.utils.progress import ProgressMeter

TOKENIZER_KINDS = ("sentencepiece", "hf-bpe", "tiktoken")
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram", "char", "word")
#: kind -> (main file written, --tokenizer-type that loads it)
KIND_OUTPUTS: Dict[str, tuple] = {
    "sentencepiece": ("tokenizer.model", "GPTSentencePieceTokenizer"),
    "hf-bpe": ("tokenizer.json", "HuggingFaceTokenizer"),
    "tiktoken": ("tokenizer.tiktoken", "TikTokenizer"),
}
# Smallest sensible vocabularies: the 256 bytes plus the special tokens (and one merge).
_MIN_VOCAB = {
    "sentencepiece": 300,
    "hf-bpe": 256 + len(TRAINED_SPECIAL_TOKENS) + 1,
    "tiktoken": 256 + len(LLAMA3_SPECIAL_TOKENS) + 1,
}
_SP_MAX_SENTENCE_BYTES = 16384
_SP_SAMPLE_SENTENCES = 10_000_000  # SentencePiece samples (with the seed) beyond this many lines
# A fixed thread count: SentencePiece stores it in the model, and unigram scores depend on it, so a
# machine-dependent count would make the same inputs and seed give different files on different hosts.
_SP_THREADS = 16
_TIKTOKEN_CHECK_DOCUMENTS = 200

EXAMPLES = """examples:
  # SentencePiece BPE with 32k pieces on Arabic + English JSONL shards
  megalign train-tokenizer --input 'data/raw/*.jsonl.zst' --output-dir tokenizers/sp32k --vocab-size 32000
  # Hugging Face byte-level BPE (loads in transformers.AutoTokenizer), first 1M documents only
  megalign train-tokenizer --input data/raw --output-dir tokenizers/bpe64k --tokenizer-kind hf-bpe \\
      --vocab-size 64000 --max-documents 1000000
  # tiktoken ranks (Llama-3 layout: 256 special tokens after the ranks, counted in --vocab-size)
  megalign train-tokenizer --input corpus.jsonl --output-dir tokenizers/tik --tokenizer-kind tiktoken
  # then tokenize a corpus with it:
  megalign preprocess --input 'data/raw/*.jsonl.zst' --output-prefix data/sp32k --workers 8 --append-eod \
      --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tokenizers/sp32k/tokenizer.model
"""


def iter_documents(
    inputs: Sequence[str], json_keys: Sequence[str], max_documents: Optional[int] = None, progress: bool = True
) -> Iterator[str]:
    """Yield the non-empty texts under `json_keys` of the first `max_documents` records of the inputs."""
    paths = expand_inputs(inputs)
    meter = ProgressMeter("train-tokenizer: reading", total=max_documents, unit="docs", enabled=progress)
    documents = 0
    for path in paths:
        for _, record in iter_records(path, json_keys):
            if max_documents is not None and documents >= max_documents:
                break
            documents += 1
            size = 0
            for key in json_keys:
                text = record[key]
                size += len(text)
                if text.strip():
                    yield text
            meter.update(docs=1, chars=size)
    meter.close()


def _sentencepiece_lines(texts: Iterable[str], max_bytes: int = _SP_MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Lines of the texts, long ones cut at spaces so that none exceeds `max_bytes` UTF-8 bytes
    (SentencePiece silently drops longer sentences)."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                cut = max_bytes // 4  # at most 4 bytes per character, so this prefix fits
                space = line.rfind(" ", cut // 2, cut)
                cut = space if space > 0 else cut
                yield line[:cut]
                line = line[cut:]
            yield line


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe", seed: int = 1234) -> bytes:
    """Train a SentencePiece model (Llama-2 settings: identity normalisation, byte fallback, split
    digits; Llama-3 special pieces) and return the serialized model."""
    import sentencepiece

    sentencepiece.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_sentencepiece_lines(texts),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=0.9999,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece=BEGIN_OF_TEXT,
            eos_piece=END_OF_TEXT,
            pad_piece=PAD,
            user_defined_symbols=[START_HEADER, END_HEADER, END_OF_TURN],
            hard_vocab_limit=False,
            max_sentence_length=_SP_MAX_SENTENCE_BYTES,
            input_sentence_size=_SP_SAMPLE_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=_SP_THREADS,
            minloglevel=2,
        )
    except RuntimeError as error:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
        if needed:
            raise ConfigError(
                f"--vocab-size {vocab_size} is too small: this corpus has characters and special pieces "
                f"that need at least {needed.group(1)} SentencePiece entries"
            ) from None
        raise ConfigError(
            f"SentencePiece training failed: {error} (a larger corpus, or a --vocab-size that fits it, usually helps)"
        ) from None
    return model.getvalue()


def _byte_level_bpe(vocab_size: int, special_tokens: Sequence[str]):
    """An untrained Llama-3-style byte-level BPE tokenizer and its trainer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = TRAINED_SPECIAL_TOKENS):
    """Train a byte-level BPE `tokenizers.Tokenizer` (specials get the first ids; bos is added by its
    post-processor, as Llama-3's does, when transformers encodes with add_special_tokens=True)."""
    from tokenizers import processors

    tokenizer, trainer = _byte_level_bpe(vocab_size, special_tokens)
    tokenizer.train_from_iterator(texts, trainer)
    if BEGIN_OF_TEXT in special_tokens:
        bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BEGIN_OF_TEXT} $A",
                    pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B:1",
                    special_tokens=[(BEGIN_OF_TEXT, bos_id)],
                ),
            ]
        )
    return tokenizer


def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest for U+0100 on."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def ranks_from_byte_level_bpe(tokenizer) -> Dict[bytes, int]:
    """tiktoken ranks of a trained byte-level BPE: the 256 bytes (rank = byte value), then each merge's
    result in merge order, so that tiktoken's lowest-rank-first merging replays the BPE merges."""
    decode = {char: byte for byte, char in _byte_to_unicode().items()}
    model = json.loads(tokenizer.to_str())["model"]
    ranks = {bytes([byte]): byte for byte in range(256)}
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = bytes(decode[char] for char in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


def tiktoken_lines(ranks: Dict[bytes, int]) -> str:
    """The .tiktoken text: 'base64(token bytes) rank' per line, by rank."""
    return "".join(
        f"{base64.b64encode(token).decode('ascii')} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )


def tiktoken_agreement(tokenizer, ranks: Dict[bytes, int], texts: Iterable[str]) -> tuple:
    """(texts where tiktoken's ids equal the BPE's, texts checked)."""
    import tiktoken

    encoding = tiktoken.Encoding("megalign-check", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    decode = {char: byte for byte, char in _byte_to_unicode().items()}
    rank_of_id = {
        token_id: ranks[bytes(decode[char] for char in token)]
        for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items()
    }
    agree = checked = 0
    for text in texts:
        expected = [rank_of_id[i] for i in tokenizer.encode(text, add_special_tokens=False).ids]
        agree += expected == encoding.encode_ordinary(text)
        checked += 1
    return agree, checked


def hf_tokenizer_config() -> dict:
    """tokenizer_config.json for a trained hf-bpe tokenizer (transformers.AutoTokenizer reads it)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA3_CHAT_TEMPLATE_JINJA,
    }


def _check_arguments(
    kind: str, vocab_size: int, model_type: str, json_keys: Sequence[str], max_documents: Optional[int]
) -> None:
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"--tokenizer-kind '{kind}' is not one of {', '.join(TOKENIZER_KINDS)}")
    if model_type not in SENTENCEPIECE_MODEL_TYPES:
        raise ConfigError(f"--model-type '{model_type}' is not one of {', '.join(SENTENCEPIECE_MODEL_TYPES)}")
    if kind != "sentencepiece" and model_type != "bpe":
        raise ConfigError(f"--model-type {model_type} applies to sentencepiece only; {kind} is always BPE")
    if vocab_size < _MIN_VOCAB[kind]:
        raise ConfigError(f"--vocab-size {vocab_size} is too small for {kind}: use at least {_MIN_VOCAB[kind]}")
    if not json_keys:
        raise ConfigError("--json-keys needs at least one key")
    if max_documents is not None and max_documents <= 0:
        raise ConfigError(f"--max-documents must be positive, got {max_documents}")


def train_tokenizer(
    inputs: Sequence[str],
    output_dir: str,
    *,
    kind: str = "sentencepiece",
    vocab_size: int = 8000,
    json_keys: Sequence[str] = ("text",),
    model_type: str = "bpe",
    max_documents: Optional[int] = None,
    seed: int = 1234,
) -> str:
    """Train a tokenizer of `kind` on the JSONL `inputs` and write it into `output_dir`; returns the
    path of the main file (tokenizer.model, tokenizer.json or tokenizer.tiktoken)."""
    _check_arguments(kind, vocab_size, model_type, json_keys, max_documents)
    paths = expand_inputs(inputs)  # fail on bad globs before any work
    counts = {"documents": 0, "characters": 0}

    def texts() -> Iterator[str]:
        for text in iter_documents(paths, json_keys, max_documents):
            counts["documents"] += 1
            counts["characters"] += len(text)
            yield text

    main_name = KIND_OUTPUTS[kind][0]
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".train-tokenizer-", dir=output_dir)
    try:
        files: Dict[str, Callable[[str], None]] = {}
        if kind == "sentencepiece":
            model = train_sentencepiece(texts(), vocab_size, model_type, seed)
            files[main_name] = lambda path: _write_bytes(path, model)
        else:
            specials = TRAINED_SPECIAL_TOKENS if kind == "hf-bpe" else ()
            bpe_size = vocab_size if kind == "hf-bpe" else vocab_size - len(LLAMA3_SPECIAL_TOKENS)
            bpe = train_byte_level_bpe(texts(), bpe_size, specials)
            if kind == "hf-bpe":
                files["tokenizer_config.json"] = lambda path: write_json_atomic(path, hf_tokenizer_config())
                files[main_name] = lambda path: _write_bytes(path, bpe.to_str(pretty=True).encode("utf-8"))
            else:
                ranks = ranks_from_byte_level_bpe(bpe)
                _report_tiktoken_agreement(bpe, ranks, paths, json_keys)
                files[main_name] = lambda path: _write_bytes(path, tiktoken_lines(ranks).encode("ascii"))
        if counts["documents"] == 0:
            raise DataFormatError(f"no text found under keys {', '.join(json_keys)} in {', '.join(paths)}")
        provenance = {
            "kind": kind,
            "model_type": model_type if kind == "sentencepiece" else "bpe",
            "vocab_size_requested": vocab_size,
            "json_keys": list(json_keys),
            "inputs": list(paths),
            "max_documents": max_documents,
            "seed": seed,
            **counts,
        }
        # Main file last: its presence means the folder is complete.
        ordered = [("tokenizer_training.json", lambda path: write_json_atomic(path, provenance))]
        ordered += sorted(files.items(), key=lambda item: item[0] == main_name)
        for name, write in ordered:
            write(os.path.join(staging, name))
        for name, _ in ordered:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(output_dir, main_name)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _report_tiktoken_agreement(bpe, ranks: Dict[bytes, int], paths: Sequence[str], json_keys: Sequence[str]) -> None:
    """Check on the first documents that tiktoken with the derived ranks reproduces the BPE's ids."""
    sample = iter_documents(paths, json_keys, _TIKTOKEN_CHECK_DOCUMENTS, progress=False)
    agree, checked = tiktoken_agreement(bpe, ranks, sample)
    if agree != checked:
        print(
            f"train-tokenizer: warning: tiktoken ids differ from the trained BPE on {checked - agree} of "
            f"{checked} checked documents",
            file=sys.stderr,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `megalign train-tokenizer`."""
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="JSONL files, folders or quoted globs (.jsonl, .jsonl.gz, .jsonl.zst)",
    )
    parser.add_argument("--output-dir", required=True, help="folder to write the tokenizer files into")
    parser.add_argument(
        "--tokenizer-kind",
        choices=TOKENIZER_KINDS,
        default="sentencepiece",
        help="sentencepiece (tokenizer.model), hf-bpe (tokenizer.json) or tiktoken "
        "(tokenizer.tiktoken) (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8000, help="vocabulary size including special tokens (default: %(default)s)"
    )
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="record fields to train on (default: text)")
    parser.add_argument(
        "--model-type",
        choices=SENTENCEPIECE_MODEL_TYPES,
        default="bpe",
        help="SentencePiece model type (default: %(default)s)",
    )
    parser.add_argument(
        "--max-documents", type=int, default=None, help="train on the first N records only (default: all)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    """Run `megalign train-tokenizer`: train, load the result back, print where it is and how to use it."""
    start = time.monotonic()
    path = train_tokenizer(
        args.input,
        args.output_dir,
        kind=args.tokenizer_kind,
        vocab_size=args.vocab_size,
        json_keys=args.json_keys,
        model_type=args.model_type,
        max_documents=args.max_documents,
        seed=args.seed,
    )
    tokenizer_type = KIND_OUTPUTS[args.tokenizer_kind][1]
    model = args.output_dir if args.tokenizer_kind == "hf-bpe" else path
    tokenizer = build_tokenizer(tokenizer_type, model)
    print(f"train-tokenizer: wrote {path} (vocabulary {tokenizer.vocab_size}) in {time.monotonic() - start:.1f}s")
    print(f"use it with: --tokenizer-type {tokenizer_type} --tokenizer-model {model}")
    return 0
