"""Shared test fixtures: the shipped sample corpus, the shared real Arabic data, a trained tokenizer.

Tests build every model and tokenizer they need at run time (no hub is reachable).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO_ROOT / "examples" / "data" / "sample.jsonl"
SHARED_ARABIC = REPO_ROOT.parent / "shared" / "data" / "arabic"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    """The shipped sample corpus (examples/data/sample.jsonl): mixed Arabic/English documents."""
    assert SAMPLE_CORPUS.is_file(), f"missing shipped sample corpus {SAMPLE_CORPUS}"
    return SAMPLE_CORPUS


@pytest.fixture(scope="session")
def shared_arabic_dir() -> Path:
    """../shared/data/arabic (real Arabic news and Wikipedia); tests using it skip when absent."""
    if not (SHARED_ARABIC / "saudinewsnet_sample.jsonl").is_file():
        pytest.skip(f"real Arabic data not present at {SHARED_ARABIC}")
    return SHARED_ARABIC


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path) -> Path:
    """A small SentencePiece BPE model trained on the sample corpus (path to tokenizer.model)."""
    from megalign.data.tokenizer_training import train_tokenizer

    out_dir = tmp_path_factory.mktemp("sp_tokenizer")
    return Path(train_tokenizer([str(sample_corpus)], str(out_dir), kind="sentencepiece", vocab_size=1000))


@pytest.fixture(scope="session")
def hf_bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path) -> Path:
    """A small Hugging Face byte-level BPE tokenizer trained on the sample corpus (path to tokenizer.json)."""
    from megalign.data.tokenizer_training import train_tokenizer

    out_dir = tmp_path_factory.mktemp("hf_tokenizer")
    return Path(train_tokenizer([str(sample_corpus)], str(out_dir), kind="hf-bpe", vocab_size=1000))


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path, sentencepiece_model: Path) -> str:
    """The sample corpus preprocessed with `sentencepiece_model` (with EOD); returns the dataset prefix."""
    from megalign.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("sample_data")
    preprocess([str(sample_corpus)], str(out / "sample"), "SentencePieceTokenizer", str(sentencepiece_model),
               append_eod=True, progress=False)
    return str(out / "sample_text_document")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Tests marked `slow` run only with MEGALIGN_SLOW=1 (CI keeps to the fast set)."""
    if os.environ.get("MEGALIGN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: set MEGALIGN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
