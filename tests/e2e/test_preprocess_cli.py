"""`python tools/preprocess_data.py` and `megalign preprocess`, run as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from megalign.data.indexed_dataset import IndexedDataset
from megalign.data.tokenizers import build_tokenizer

MEGALIGN = str(Path(sys.executable).parent / "megalign")


def run(command: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def files_of(prefix: Path) -> bytes:
    return prefix.with_suffix(".bin").read_bytes() + prefix.with_suffix(".idx").read_bytes()


def test_tool_script_and_subcommand_agree(tmp_path: Path, repo_root: Path, sample_corpus: Path,
                                          hf_bpe_tokenizer: Path) -> None:
    flags = ["--input", str(sample_corpus), "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", str(hf_bpe_tokenizer.parent), "--append-eod", "--log-interval", "0"]
    script = run([sys.executable, "tools/preprocess_data.py", *flags, "--output-prefix", str(tmp_path / "a" / "c"),
                  "--workers", "2"], repo_root)
    assert script.returncode == 0, script.stderr
    assert "preprocess: 400 documents" in script.stdout
    assert "MB/s" in script.stderr and "ETA" in script.stderr  # progress lines
    command = run([MEGALIGN, "preprocess", *flags, "--output-prefix", str(tmp_path / "b" / "c")], tmp_path)
    assert command.returncode == 0, command.stderr
    first, second = tmp_path / "a" / "c_text_document", tmp_path / "b" / "c_text_document"
    assert files_of(first) == files_of(second)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(hf_bpe_tokenizer.parent))
    dataset = IndexedDataset(str(first))
    record = json.loads(sample_corpus.read_text(encoding="utf-8").splitlines()[7])
    assert tokenizer.decode(dataset[7][:-1].tolist()) == record["text"]


def test_bad_record_fails_with_file_line_and_no_output(tmp_path: Path) -> None:
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text('{"text": "1 2"}\n{"txt": "3"}\n{"text": "4"}\n')
    flags = ["--input", str(corpus), "--output-prefix", str(tmp_path / "out" / "ids"),
             "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    result = run([MEGALIGN, "preprocess", *flags], tmp_path)
    assert result.returncode == 2
    assert f"{corpus}:2: missing key 'text'" in result.stderr and "--skip-bad-records" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "out") == []

    skipped = run([MEGALIGN, "preprocess", *flags, "--skip-bad-records"], tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 bad record (missing_key: 1)" in skipped.stdout
    assert f"{corpus}:2: missing key 'text'" in skipped.stdout


def test_glob_matching_nothing_and_help(tmp_path: Path) -> None:
    result = run([MEGALIGN, "preprocess", "--input", str(tmp_path / "*.jsonl"), "--output-prefix", str(tmp_path / "x"),
                  "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"], tmp_path)
    assert result.returncode == 2 and "matches no file" in result.stderr and str(tmp_path / "*.jsonl") in result.stderr
    help_text = run([MEGALIGN, "preprocess", "--help"], tmp_path)
    assert help_text.returncode == 0
    for flag in ("--input", "--json-keys", "--output-prefix", "--tokenizer-type", "--tokenizer-model", "--vocab-size",
                 "--append-eod", "--workers", "--skip-bad-records", "--log-interval", "examples:"):
        assert flag in help_text.stdout


def test_real_arabic_corpus(tmp_path: Path, repo_root: Path, shared_arabic_dir: Path,
                            sentencepiece_model: Path) -> None:
    corpus = shared_arabic_dir / "arwiki_paragraphs.jsonl"
    result = run([sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix",
                  str(tmp_path / "arwiki"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                  str(sentencepiece_model), "--append-eod", "--workers", "2"], repo_root)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = IndexedDataset(str(tmp_path / "arwiki_text_document"))
    assert dataset.num_documents == len(records)
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    for index in (0, len(records) // 2, len(records) - 1):
        assert tokenizer.decode(dataset[index][:-1].tolist()) == records[index]["text"]


@pytest.mark.parametrize("entry", ["script", "megalign"])
def test_tokenizer_errors_are_one_line(tmp_path: Path, repo_root: Path, entry: str) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    head = [sys.executable, "tools/preprocess_data.py"] if entry == "script" else [MEGALIGN, "preprocess"]
    result = run([*head, "--input", str(corpus), "--output-prefix", str(tmp_path / "x"), "--tokenizer-type",
                  "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "missing")], repo_root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing" in result.stderr
