"""`megalign preprocess --sft`, run as a user runs it (python -m megalign.cli and tools/preprocess_data.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from megalign.data.indexed_dataset import IndexedDataset
from megalign.data.sft_dataset import build_sft_datasets
from megalign.data.tokenizers import END_OF_TURN, build_tokenizer

RECORDS = [
    {"messages": [{"role": "system", "content": "أنت مساعد مفيد."}, {"role": "user", "content": "أعد صياغة: مرحبا"},
                  {"role": "assistant", "content": "أهلاً وسهلاً."}]},
    {"prompt": "Fix the spacing: hello ,world", "response": "Hello, world."},
    {"prompt": "Say yes", "response": "Yes.", "system": "Answer in one word."},
]


def run(command: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_sft_preprocess_from_the_command_line(tmp_path: Path, repo_root: Path, sentencepiece_model: Path) -> None:
    corpus = tmp_path / "sft.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS) + '{"text": "x"}\n',
                      encoding="utf-8")
    flags = ["preprocess", "--sft", "--input", str(corpus), "--output-prefix", str(tmp_path / "out" / "worker"),
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(sentencepiece_model),
             "--log-interval", "0"]
    failed = run([sys.executable, "-m", "megalign.cli", *flags], tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert f"{corpus}:4: missing key 'messages' (or 'prompt' and 'response')" in failed.stderr
    assert "--skip-bad-records" in failed.stderr and not os.listdir(tmp_path / "out")

    result = run([sys.executable, "-m", "megalign.cli", *flags, "--skip-bad-records", "--workers", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "preprocess: 3 conversations" in result.stdout and "loss mask:" in result.stdout
    assert "skipped 1 bad record (missing_key: 1)" in result.stdout
    prefix = tmp_path / "out" / "worker_sft_document"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"worker_sft_document{suffix}.{ext}" for suffix in ("", "_loss_mask") for ext in ("bin", "idx"))
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    tokens, mask = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}_loss_mask")
    replies = [tokenizer.decode(tokens[i][mask[i] == 1].tolist()) for i in range(3)]
    assert replies == [f"أهلاً وسهلاً.{END_OF_TURN}", f"Hello, world.{END_OF_TURN}", f"Yes.{END_OF_TURN}"]

    script = run([sys.executable, "tools/preprocess_data.py", *flags[1:], "--skip-bad-records", "--output-prefix",
                  str(tmp_path / "script" / "worker")], repo_root)
    assert script.returncode == 0, script.stderr
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert (tmp_path / "script" / f"worker_sft_document{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes()

    train, _, _ = build_sft_datasets(str(prefix), "1,0,0", [6, None, None], seq_length=256, seed=0,
                                     pad_token=tokenizer.pad, eod_token=tokenizer.eod)
    assert len(train) == 6 and train.num_truncated == 0
    for i in range(6):  # the trained label positions are exactly the reply tokens
        sample = train[i]
        trained = sample["labels"][sample["loss_mask"] == 1].tolist()
        assert tokenizer.decode(trained) in replies


def test_json_keys_with_sft_is_refused_naming_both_flags(tmp_path: Path, sentencepiece_model: Path) -> None:
    corpus = tmp_path / "sft.jsonl"
    corpus.write_text(json.dumps(RECORDS[1]) + "\n")
    result = run([sys.executable, "-m", "megalign.cli", "preprocess", "--sft", "--json-keys", "text", "--input",
                  str(corpus), "--output-prefix", str(tmp_path / "x"), "--tokenizer-type", "SentencePieceTokenizer",
                  "--tokenizer-model", str(sentencepiece_model)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--json-keys cannot be used with --sft" in result.stderr
    help_text = run([sys.executable, "-m", "megalign.cli", "preprocess", "--help"], tmp_path)
    assert "--sft" in help_text.stdout and "_loss_mask" in help_text.stdout
