"""Tokenizers: round trips on Arabic and English, special ids, batch encode, chat template, errors."""
from __future__ import annotations

import base64
import json
import pickle
import shutil
from pathlib import Path

import pytest

from megalign.data.tokenizer_training import train_tokenizer
from megalign.data.tokenizers import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    END_OF_TURN,
    LLAMA3_SPECIAL_TOKENS,
    TOKENIZER_TYPES,
    Tokenizer,
    build_tokenizer,
    padded_vocab_size,
)
from megalign.errors import ConfigError, TokenizerError

TEXTS = [
    "اللغة العربية هي أكثر اللغات السامية تحدثًا، ويتحدثها أكثر من 400 مليون نسمة.",
    "The quick brown fox jumps over the lazy dog, 1234567 times!",
    "نص مختلط: Megatron-LM يدرّب النماذج على 8 وحدات GPU في آنٍ واحد.\n\nسطر جديد\tمع تبويب",
    "  leading and  double  spaces, trailing space ",
    "emoji 🙂 and accents: café, naïve — «اقتباس»",
    "",
]
CHAT = [
    {"role": "system", "content": "أنت مساعد مفيد."},
    {"role": "user", "content": "  What is the capital of Saudi Arabia?  "},
    {"role": "assistant", "content": "الرياض."},
]


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("tiktoken")
    return Path(train_tokenizer([str(sample_corpus)], str(out), kind="tiktoken", vocab_size=1000))


@pytest.fixture(scope="module")
def hf_file_only(tmp_path_factory: pytest.TempPathFactory, hf_bpe_tokenizer: Path) -> Path:
    """The trained tokenizer.json alone (no tokenizer_config.json next to it)."""
    out = tmp_path_factory.mktemp("hf_file_only") / "tokenizer.json"
    shutil.copy(hf_bpe_tokenizer, out)
    return out


@pytest.fixture(scope="module")
def tokenizers(sentencepiece_model: Path, hf_bpe_tokenizer: Path, hf_file_only: Path, tiktoken_file: Path) -> dict:
    return {
        "sentencepiece": build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model)),
        "hf-folder": build_tokenizer("HuggingFaceTokenizer", str(hf_bpe_tokenizer.parent)),
        "hf-file": build_tokenizer("HuggingFaceTokenizer", str(hf_file_only)),
        "tiktoken": build_tokenizer("TikTokenizer", str(tiktoken_file)),
    }


TEXT_KINDS = ["sentencepiece", "hf-folder", "hf-file", "tiktoken"]


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_round_trip_arabic_and_english(tokenizers: dict, kind: str) -> None:
    tokenizer = tokenizers[kind]
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(TEXTS[0])) < len(TEXTS[0].encode("utf-8"))


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_encode_batch_equals_encode(tokenizers: dict, kind: str) -> None:
    tokenizer = tokenizers[kind]
    texts = TEXTS * 7
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
    assert tokenizer.encode_batch([]) == []


def test_sentencepiece_special_ids(tokenizers: dict, sentencepiece_model: Path) -> None:
    tokenizer = tokenizers["sentencepiece"]
    assert (tokenizer.vocab_size, tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.pad) == (1000, 1, 2, 2, 3)
    # As in Megatron, control pieces are not produced from their spelling; user-defined pieces are.
    assert tokenizer.eos not in tokenizer.encode(END_OF_TEXT)
    assert tokenizer.special_tokens[END_OF_TURN] in tokenizer.encode(f"hi{END_OF_TURN}")
    for name in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        other = build_tokenizer(name, str(sentencepiece_model))
        assert other.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
        assert (other.eod, other.vocab_size) == (tokenizer.eod, tokenizer.vocab_size)


@pytest.mark.parametrize("kind", ["hf-folder", "hf-file"])
def test_hugging_face_special_ids(tokenizers: dict, kind: str) -> None:
    tokenizer = tokenizers[kind]
    assert tokenizer.vocab_size == 1000
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad) == (0, 1, 2)  # trained specials come first
    assert tokenizer.eod == tokenizer.eos
    assert tokenizer.encode(f"a{END_OF_TEXT}b")[1] == tokenizer.eod
    assert tokenizer.encode(END_OF_TURN) == [tokenizer.special_tokens[END_OF_TURN]]


def test_tiktoken_special_ids(tokenizers: dict, tiktoken_file: Path) -> None:
    tokenizer = tokenizers["tiktoken"]
    ranks = sum(1 for line in tiktoken_file.read_text().splitlines() if line.strip())
    assert tokenizer.vocab_size == ranks + len(LLAMA3_SPECIAL_TOKENS) == 1000
    assert tokenizer.bos == ranks and tokenizer.eos == ranks + 1 == tokenizer.eod
    assert tokenizer.pad == ranks + LLAMA3_SPECIAL_TOKENS.index("<|finetune_right_pad_id|>")
    assert tokenizer.encode(f"x{BEGIN_OF_TEXT}")[-1] == tokenizer.bos
    assert tokenizer.decode([tokenizer.eod]) == END_OF_TEXT


def test_megatron_tiktoken_json_vocabulary(tmp_path: Path, tiktoken_file: Path) -> None:
    lines = [line.split() for line in tiktoken_file.read_text().splitlines() if line.strip()]
    entries = [
        {"rank": int(rank), "token_bytes": token, "token_str": base64.b64decode(token).decode("utf-8", "replace")}
        for token, rank in lines
    ]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(entries))
    tokenizer = build_tokenizer("TikTokenizer", str(vocab))
    assert (tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.pad) == (1, 2, 2, 4)
    assert tokenizer.vocab_size == 1000 + len(entries)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert all(i >= 1000 for i in ids) and tokenizer.decode(ids) == text
    assert tokenizer.encode("</s>") == [2]


def test_null_tokenizer_follows_megatron() -> None:
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tokenizer.vocab_size == 101 and tokenizer.eod == 100 == tokenizer.vocab_size - 1
    assert tokenizer.bos is None and tokenizer.pad is None
    assert tokenizer.encode("5 17  99\n0") == [5, 17, 99, 0]
    assert tokenizer.encode_batch(["1 2", "3"]) == [[1, 2], [3]]
    assert tokenizer.decode([5, 17, 100]) == "5 17 100"
    with pytest.raises(TokenizerError, match="integer ids"):
        tokenizer.encode("5 seventeen")
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer.encode("101")
    with pytest.raises(TokenizerError, match="chat"):
        tokenizer.apply_chat_template(CHAT)
    with pytest.raises(TokenizerError, match="vocab_size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(TokenizerError, match="no model file"):
        build_tokenizer("NullTokenizer", "model.bin", vocab_size=10)


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [(1000, 128, 1, 1024), (1024, 128, 1, 1024), (50257, 128, 1, 50304), (50257, 128, 2, 50432),
     (128256, 128, 1, 128256), (128256, 128, 8, 129024), (32000, 64, 4, 32000), (7, 1, 1, 7)],
)
def test_padded_vocab_size(vocab: int, divisible_by: int, tp: int, expected: int) -> None:
    assert padded_vocab_size(vocab, divisible_by, tp) == expected


def test_padded_vocab_size_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        padded_vocab_size(1000, 128, 0)
    with pytest.raises(ConfigError, match="vocab_size"):
        padded_vocab_size(-5)


EXPECTED_CHAT = (
    "<|start_header_id|>system<|end_header_id|>\n\nأنت مساعد مفيد.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of Saudi Arabia?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nالرياض.<|eot_id|>"
)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_chat_template(tokenizers: dict, kind: str) -> None:
    tokenizer = tokenizers[kind]
    bos = "" if kind == "sentencepiece" else BEGIN_OF_TEXT  # SentencePiece's bos is a control piece
    assert tokenizer.apply_chat_template(CHAT) == bos + EXPECTED_CHAT
    prompt = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT))
    assert ids.count(tokenizer.special_tokens[END_OF_TURN]) == 3


def test_hf_jinja_template_is_used(tokenizers: dict) -> None:
    folder = tokenizers["hf-folder"]
    assert folder.chat_template is not None and tokenizers["hf-file"].chat_template is None
    folder.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    try:
        assert folder.apply_chat_template(CHAT[:1]) == "[system]أنت مساعد مفيد."
    finally:
        folder.chat_template = build_tokenizer("HuggingFaceTokenizer", folder.model_path).chat_template


@pytest.mark.parametrize(
    "messages, match",
    [([{"role": "robot", "content": "x"}], "role 'robot'"), ([{"role": "user"}], "content"), ("hello", "list")],
)
def test_chat_template_rejects_bad_messages(tokenizers: dict, messages, match: str) -> None:
    for tokenizer in tokenizers.values():
        with pytest.raises(TokenizerError, match=match):
            tokenizer.apply_chat_template(messages)


def test_unknown_type_lists_valid_types() -> None:
    with pytest.raises(TokenizerError) as info:
        build_tokenizer("SentencepieceTokenizer", "x.model")
    message = str(info.value)
    assert "did you mean SentencePieceTokenizer" in message
    assert all(name in message for name in TOKENIZER_TYPES)


@pytest.mark.parametrize("tokenizer_type", ["GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer"])
def test_missing_model_file_is_named(tmp_path: Path, tokenizer_type: str) -> None:
    missing = tmp_path / "nope" / "tokenizer.file"
    with pytest.raises(TokenizerError, match=str(missing)):
        build_tokenizer(tokenizer_type, str(missing))
    with pytest.raises(TokenizerError, match="model path"):
        build_tokenizer(tokenizer_type, None)


def test_unreadable_model_files(tmp_path: Path, sentencepiece_model: Path, hf_bpe_tokenizer: Path) -> None:
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer("Llama2Tokenizer", str(garbage))
    with pytest.raises(TokenizerError, match="is a directory"):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(garbage))
    with pytest.raises(TokenizerError, match=rf"{garbage}:1: not a tiktoken line"):
        build_tokenizer("TikTokenizer", str(garbage))
    with pytest.raises(TokenizerError, match=rf"{sentencepiece_model}:\d+: not a tiktoken line"):
        build_tokenizer("TikTokenizer", str(sentencepiece_model))
    with pytest.raises(TokenizerError, match="local paths only"):
        build_tokenizer("HuggingFaceTokenizer", "meta-llama/Meta-Llama-3-8B")
    with pytest.raises(TokenizerError, match="only for NullTokenizer"):
        build_tokenizer("HuggingFaceTokenizer", str(hf_bpe_tokenizer), vocab_size=1000)


def test_tiktoken_needs_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "small.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(200)))
    with pytest.raises(TokenizerError, match="56 single bytes"):
        build_tokenizer("TikTokenizer", str(path))


def test_hf_config_problems(tmp_path: Path, hf_bpe_tokenizer: Path) -> None:
    shutil.copy(hf_bpe_tokenizer, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_there|>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|not_there\|>' from .* is not in the vocabulary"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    with pytest.raises(TokenizerError, match="no end-of-sequence token"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer_config.json' is not valid JSON"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": END_OF_TURN}}))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json"))
    assert tokenizer.eod == tokenizer.special_tokens[END_OF_TURN]


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_decode_rejects_foreign_ids(tokenizers: dict, kind: str) -> None:
    tokenizer = tokenizers[kind]
    with pytest.raises(TokenizerError, match=f"token id {tokenizer.vocab_size} is outside"):
        tokenizer.decode([3, tokenizer.vocab_size])


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_describe_and_rebuild_in_worker(tokenizers: dict, kind: str) -> None:
    tokenizer: Tokenizer = tokenizers[kind]
    description = tokenizer.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["vocab_size"] == tokenizer.vocab_size and description["eod"] == tokenizer.eod
    assert len(description["sha256"]) == 64
    clone = pickle.loads(pickle.dumps(tokenizer))  # what multiprocessing does: rebuilt from (type, path)
    assert clone is not tokenizer and clone.describe() == description
    assert clone.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    null = pickle.loads(pickle.dumps(build_tokenizer("NullTokenizer", vocab_size=7)))
    assert (null.vocab_size, null.eod) == (8, 7)


def test_describe_hash_follows_content(tmp_path: Path, hf_bpe_tokenizer: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_bpe_tokenizer.parent / name, tmp_path / name)
    before = build_tokenizer("HuggingFaceTokenizer", str(tmp_path)).describe()["sha256"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = END_OF_TEXT
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    after = build_tokenizer("HuggingFaceTokenizer", str(tmp_path)).describe()
    assert after["sha256"] != before and after["pad"] == after["eos"]


@pytest.mark.megatron
def test_megatron_core_gives_the_same_ids(tmp_path: Path, sentencepiece_model: Path, tiktoken_file: Path) -> None:
    """Files move both ways: megatron-core's tokenizer libraries read the same files to the same ids."""
    pytest.importorskip("megatron.core")
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer as CoreSP
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer as CoreTik

    core = CoreSP(str(sentencepiece_model))
    ours = build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model))
    assert [core.text_to_ids(text) for text in TEXTS] == ours.encode_batch(TEXTS)
    assert (core.eod, core.bos_id, core.vocab_size) == (ours.eod, ours.bos, ours.vocab_size)

    lines = [line.split() for line in tiktoken_file.read_text().splitlines() if line.strip()]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([{"rank": int(rank), "token_bytes": token, "token_str": ""} for token, rank in lines]))
    core, ours = CoreTik(str(vocab), vocab_size=1000 + len(lines)), build_tokenizer("TikTokenizer", str(vocab))
    assert [core.text_to_ids(text) for text in TEXTS] == ours.encode_batch(TEXTS)
    assert (core.eod, core.bos_id, core.pad_id) == (ours.eod, ours.bos, ours.pad)


# ---- GPT2BPETokenizer (Megatron's --tokenizer-type GPT2BPETokenizer --vocab-file --merge-file) -------------------

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _reference_gpt2_encode(text: str, vocab: dict, merges: list) -> list:
    """OpenAI's original GPT-2 encoder algorithm (regex split, byte-to-unicode map, lowest-rank merges first)."""
    import regex

    ranks = {pair: rank for rank, pair in enumerate(merges)}
    byte_map = _bytes_to_unicode()
    ids = []
    for piece in regex.findall(_GPT2_PATTERN, text):
        word = [byte_map[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
        ids += [vocab[token] for token in word]
    return ids


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 vocab.json + merges.txt, trained at test time with the tokenizers library."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(TEXTS * 5, vocab_size=500, min_frequency=1, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(folder))
    return folder


def _gpt2(folder: Path) -> Tokenizer:
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(folder / "vocab.json"),
                           merge_file=str(folder / "merges.txt"))


def test_gpt2_bpe_matches_the_reference_algorithm(gpt2_files: Path) -> None:
    tokenizer = _gpt2(gpt2_files)
    vocab = json.loads((gpt2_files / "vocab.json").read_text(encoding="utf-8"))
    lines = (gpt2_files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    for text in TEXTS + ["unseen words: zebra quixotic 987654 ؟!", "it's they'll we've"]:
        ids = tokenizer.encode(text)
        assert ids == _reference_gpt2_encode(text, vocab, merges), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(text) for text in TEXTS]


def test_gpt2_bpe_end_of_text_and_sizes(gpt2_files: Path) -> None:
    tokenizer = _gpt2(gpt2_files)
    vocab = json.loads((gpt2_files / "vocab.json").read_text(encoding="utf-8"))
    assert tokenizer.eod == tokenizer.eos == vocab["<|endoftext|>"]
    assert tokenizer.vocab_size == max(vocab.values()) + 1
    assert tokenizer.encode("a<|endoftext|>b").count(tokenizer.eod) == 1  # one special id, as HF's GPT-2
    again = pickle.loads(pickle.dumps(tokenizer))  # a worker rebuilds it from the two paths
    assert again.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1]) and again.describe() == tokenizer.describe()
    # preprocess can name the folder that holds both files
    folder = build_tokenizer("GPT2BPETokenizer", str(gpt2_files))
    assert folder.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


def test_gpt2_bpe_bad_files(tmp_path: Path, gpt2_files: Path) -> None:
    vocab, merges = gpt2_files / "vocab.json", gpt2_files / "merges.txt"
    with pytest.raises(TokenizerError, match="needs --vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab))
    bad_merges = tmp_path / "bad_merges.txt"
    bad_merges.write_text("#version: 0.2\nab\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"bad_merges.txt:2: expected two pieces"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(bad_merges))
    foreign = tmp_path / "foreign_merges.txt"
    foreign.write_text("#version: 0.2\nqq zz\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="lacks"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(foreign))
    no_eot = tmp_path / "vocab.json"
    data = json.loads(vocab.read_text(encoding="utf-8"))
    del data["<|endoftext|>"]
    no_eot.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="no <\\|endoftext\\|> token"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(no_eot), merge_file=str(merges))
    with pytest.raises(TokenizerError, match="are for GPT2BPETokenizer"):
        build_tokenizer("NullTokenizer", vocab_size=8, vocab_file=str(vocab))
