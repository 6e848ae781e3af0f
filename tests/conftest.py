"""Shared test fixtures: the shipped sample corpus, the shared real Arabic data, a trained tokenizer.

Tests build every model and tokenizer they need at run time (no hub is reachable).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO_ROOT / "megalign" / "demo" / "data" / "sample.jsonl"
SHARED_ARABIC = REPO_ROOT.parent / "shared" / "data" / "arabic"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    """The shipped sample corpus (megalign/demo/data/sample.jsonl): mixed Arabic/English documents."""
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


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory: pytest.TempPathFactory, hf_bpe_tokenizer: Path):
    """(transformers LlamaForCausalLM, its save_pretrained folder with the `hf_bpe_tokenizer` files): a random
    tiny Llama (preset tiny, vocabulary 1000, rope_theta 5e5, 256 positions) with every weight perturbed, so a
    wrong weight mapping shows. Built from a config; nothing is downloaded."""
    import shutil

    transformers = pytest.importorskip("transformers")
    import torch

    from megalign.config.model import preset, to_hf_config

    config = preset("tiny", vocab_size=1000, rope_theta=500000.0)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**to_hf_config(config), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms start at 1: perturb everything
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    hf_dir = tmp_path_factory.mktemp("tiny_llama_hf")
    model.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf_bpe_tokenizer.parent / name, hf_dir / name)
    return model, hf_dir


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_llama_hf) -> Path:
    """`tiny_llama_hf` imported with `megalign convert hf-to-megalign` (tokenizer files included): a checkpoint
    that `megalign serve`, the rewrite stage and the scorers load as they are. Returns its directory."""
    from megalign.convert import convert_hf_to_megalign

    checkpoint = tmp_path_factory.mktemp("tiny_llama_ckpt") / "worker"
    convert_hf_to_megalign(tiny_llama_hf[1], checkpoint, progress=False)
    return checkpoint
