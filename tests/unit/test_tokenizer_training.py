"""Tokenizer training: determinism, Arabic compression, tiktoken ranks, inputs, errors, the CLI, transformers."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from megalign.cli import main as cli_main
from megalign.data.tokenizer_training import (
    KIND_OUTPUTS,
    _sentencepiece_lines,
    iter_documents,
    ranks_from_byte_level_bpe,
    tiktoken_agreement,
    train_byte_level_bpe,
    train_tokenizer,
)
from megalign.data.tokenizers import END_OF_TURN, build_tokenizer
from megalign.errors import BadRecordError, ConfigError, DataFormatError

ARABIC = (
    "تُعد المملكة العربية السعودية من أكبر الدول العربية مساحةً، وتقع في الجزء الجنوبي الغربي من قارة آسيا. "
    "وعاصمتها مدينة الرياض، وهي من أكبر المدن في شبه الجزيرة العربية، ويبلغ عدد سكانها ملايين النسمات."
)


def _arabic_texts(shared_dir: Path | None) -> list:
    texts = [ARABIC]
    if shared_dir is not None:  # held-out real news (the sample corpus is not drawn from it)
        with open(shared_dir / "saudinewsnet_sample.jsonl", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for _, line in zip(range(30), handle)]
    return texts


@pytest.fixture(scope="module")
def arabic_texts(request: pytest.FixtureRequest) -> list:
    try:
        shared = request.getfixturevalue("shared_arabic_dir")
    except pytest.skip.Exception:
        shared = None
    return _arabic_texts(shared)


def _load(kind: str, main_file: str):
    model = os.path.dirname(main_file) if kind == "hf-bpe" else main_file
    return build_tokenizer(KIND_OUTPUTS[kind][1], model)


@pytest.mark.parametrize("kind", ["sentencepiece", "hf-bpe", "tiktoken"])
def test_training_is_deterministic_and_compresses_arabic(
    tmp_path: Path, sample_corpus: Path, arabic_texts: list, kind: str
) -> None:
    first = train_tokenizer([str(sample_corpus)], str(tmp_path / "a"), kind=kind, vocab_size=800, seed=7)
    second = train_tokenizer([str(sample_corpus)], str(tmp_path / "b"), kind=kind, vocab_size=800, seed=7)
    assert os.path.basename(first) == KIND_OUTPUTS[kind][0]
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))  # and no staging folder left behind
    assert not any(name.startswith(".") for name in names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    tokenizer = _load(kind, first)
    assert tokenizer.vocab_size <= 800
    for text in arabic_texts:
        ids = tokenizer.encode(text)
        assert len(ids) < len(text.encode("utf-8")) / 2, "the trained vocabulary should compress Arabic"
        assert tokenizer.decode(ids) == text


def test_fixture_tokenizers_compress_arabic(
    sentencepiece_model: Path, hf_bpe_tokenizer: Path, arabic_texts: list
) -> None:
    for tokenizer in (build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model)),
                      build_tokenizer("HuggingFaceTokenizer", str(hf_bpe_tokenizer.parent))):
        ids = tokenizer.encode_batch(arabic_texts)
        tokens = sum(len(row) for row in ids)
        assert tokens < sum(len(text.encode("utf-8")) for text in arabic_texts) / 2
        assert tokenizer.vocab_size == 1000


def test_sentencepiece_model_type_and_seed(tmp_path: Path, sample_corpus: Path) -> None:
    path = train_tokenizer([str(sample_corpus)], str(tmp_path), kind="sentencepiece", vocab_size=700,
                           model_type="unigram")
    tokenizer = build_tokenizer("SentencePieceTokenizer", path)
    assert tokenizer.decode(tokenizer.encode(ARABIC)) == ARABIC
    provenance = json.loads((tmp_path / "tokenizer_training.json").read_text())
    assert provenance["model_type"] == "unigram" and provenance["seed"] == 1234


def test_tiktoken_ranks_reproduce_the_bpe(sample_corpus: Path, arabic_texts: list) -> None:
    texts = list(iter_documents([str(sample_corpus)], ["text"], progress=False))
    bpe = train_byte_level_bpe(texts, 700, special_tokens=())
    ranks = ranks_from_byte_level_bpe(bpe)
    assert sorted(ranks.values()) == list(range(len(ranks))) and len(ranks) == 700
    assert all(ranks[bytes([b])] == b for b in range(256))
    agree, checked = tiktoken_agreement(bpe, ranks, texts + arabic_texts)
    assert agree == checked == len(texts) + len(arabic_texts)


def test_inputs_compression_keys_and_max_documents(tmp_path: Path) -> None:
    records = [{"id": str(i), "body": f"{ARABIC} {i}", "title": f"عنوان {i}"} for i in range(40)]
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    (tmp_path / "plain.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(lines)
    plain = train_tokenizer([str(tmp_path / "plain.jsonl")], str(tmp_path / "p"), kind="hf-bpe", vocab_size=400,
                            json_keys=("body", "title"))
    packed = train_tokenizer([str(tmp_path / "*.gz")], str(tmp_path / "z"), kind="hf-bpe", vocab_size=400,
                             json_keys=("body", "title"))
    assert Path(plain).read_bytes() == Path(packed).read_bytes()
    train_tokenizer([str(tmp_path / "plain.jsonl")], str(tmp_path / "m"), kind="sentencepiece", vocab_size=400,
                    json_keys=("body",), max_documents=5)
    provenance = json.loads((tmp_path / "m" / "tokenizer_training.json").read_text())
    assert provenance["documents"] == 5 and provenance["json_keys"] == ["body"]
    with pytest.raises(BadRecordError, match=r"plain.jsonl:1: missing key 'text'"):
        train_tokenizer([str(tmp_path / "plain.jsonl")], str(tmp_path / "x"), kind="hf-bpe", vocab_size=400)


def test_long_lines_are_cut_for_sentencepiece() -> None:
    line = ("كلمة " * 2000).strip()
    pieces = list(_sentencepiece_lines([line + "\n\n  \nshort"], max_bytes=1000))
    assert all(len(piece.encode("utf-8")) <= 1000 for piece in pieces)
    assert "".join(pieces[:-1]) == line and pieces[-1] == "short"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kind": "wordpiece"}, ConfigError, "--tokenizer-kind 'wordpiece'"),
        ({"kind": "hf-bpe", "model_type": "unigram"}, ConfigError, "sentencepiece only"),
        ({"kind": "tiktoken", "vocab_size": 400}, ConfigError, "at least 513"),
        ({"vocab_size": 10}, ConfigError, "too small"),
        ({"vocab_size": 320}, ConfigError, r"--vocab-size 320 is too small: .* at least \d+ SentencePiece entries"),
        ({"max_documents": 0}, ConfigError, "--max-documents"),
    ],
)
def test_bad_arguments(tmp_path: Path, sample_corpus: Path, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        train_tokenizer([str(sample_corpus)], str(tmp_path / "out"), **kwargs)


def test_failures_leave_no_files(tmp_path: Path) -> None:
    empty = tmp_path / "blank.jsonl"
    empty.write_text('{"text": "   "}\n{"text": ""}\n')
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="no text found"):
        train_tokenizer([str(empty)], str(out), kind="hf-bpe", vocab_size=400)
    assert os.listdir(out) == []
    with pytest.raises(DataFormatError, match="matches no file"):
        train_tokenizer([str(tmp_path / "missing-*.jsonl")], str(out))


def test_cli_trains_and_reports(tmp_path: Path, sample_corpus: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tok"
    code = cli_main(["train-tokenizer", "--input", str(sample_corpus), "--output-dir", str(out),
                     "--tokenizer-kind", "hf-bpe", "--vocab-size", "600", "--max-documents", "100", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {out}" in printed
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(out))
    assert tokenizer.decode(tokenizer.encode(ARABIC)) == ARABIC
    assert json.loads((out / "tokenizer_training.json").read_text())["documents"] == 100

    code = cli_main(["train-tokenizer", "--input", str(tmp_path / "none*.jsonl"), "--output-dir", str(out)])
    assert code == 2
    assert "matches no file" in capsys.readouterr().err


def test_trained_hf_tokenizer_loads_in_transformers(hf_bpe_tokenizer: Path, arabic_texts: list) -> None:
    transformers = pytest.importorskip("transformers")
    folder = hf_bpe_tokenizer.parent
    ours = build_tokenizer("HuggingFaceTokenizer", str(folder))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos, ours.eos, ours.pad)
    for text in arabic_texts[:5] + ["Mixed text: مرحبا 2024!", f"turn{END_OF_TURN}"]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.encode(text) == [ours.bos] + ours.encode(text)  # Llama-3 style: bos added by default
    chat = [{"role": "user", "content": "مرحبا"}, {"role": "assistant", "content": "أهلاً"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat)
