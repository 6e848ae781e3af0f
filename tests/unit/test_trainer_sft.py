"""`megalign train --sft`: conversations from `preprocess --sft`, loss on the assistant replies only, and the
worker-training flow (`--sft --finetune` from a pre-training checkpoint)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List

import pytest
import torch

from megalign.config import load_config
from megalign.data.preprocess import preprocess
from megalign.errors import ConfigError, DataFormatError
from megalign.ops import cross_entropy
from megalign.training import batches
from megalign.training.trainer import Trainer, train


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path, sentencepiece_model: Path) -> str:
    """Pairs "rewrite this" -> the start of the same text (a copy task a tiny model learns), from the sample."""
    out = tmp_path_factory.mktemp("sft")
    with open(sample_corpus, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:200]
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for text in texts:
            record = {"system": "Rewrite.", "prompt": text[:40], "response": text[:30]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    preprocess([str(out / "pairs.jsonl")], str(out / "pairs"), "SentencePieceTokenizer", str(sentencepiece_model),
               sft=True, progress=False)
    return str(out / "pairs_sft_document")


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return ["--model-preset", "tiny", "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--data-cache-path", str(cache), "--split", "90,10,0", "--seed", "3", *extra]


def test_sft_loss_counts_only_the_replies(sft_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(load_config(_argv(sft_prefix, sentencepiece_model, tmp_path, "--sft", "--train-iters", "2",
                                        "--lr", "1e-3", "--eval-iters", "1")), stream=io.StringIO())
    try:
        batch = next(batches.micro_batches(trainer.train_data, 0, 4))
        mask = batch["loss_mask"]
        assert 0 < mask.sum() < mask.numel() and (mask[:, :5] == 0).all()  # system/prompt tokens come first
        model = trainer.model.chunks[0]
        with torch.no_grad():
            logits = model(batch["tokens"], position_ids=batch["position_ids"])
            per_token = cross_entropy(logits, batch["labels"], reduction="none")
            expected = (per_token * mask).sum() / mask.sum()
            assert torch.allclose(model(**batches.model_inputs(batch, torch.device("cpu"))), expected, rtol=1e-6)
            # the trainer's evaluation runs the same loss (one micro-batch of one global batch)
            assert trainer.model.evaluate([batch], torch.device("cpu"), torch.float32).item() == \
                pytest.approx(expected.item(), rel=1e-6)
            # changing only the tokens the loss ignores (padding after the reply) leaves the loss unchanged
            padded = batch["labels"].masked_fill(mask == 0, 0)
            assert torch.allclose(model(**batches.model_inputs({**batch, "labels": padded}, torch.device("cpu"))),
                                  expected, rtol=1e-6)
    finally:
        trainer.close()


def test_sft_learns_and_finetunes_from_pretraining(data_prefix: str, sft_prefix: str, sentencepiece_model: Path,
                                                   tmp_path: Path) -> None:
    pretrain = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--data-path",
                data_prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                str(sentencepiece_model), "--data-cache-path", str(tmp_path / "c"), "--split", "90,10,0",
                "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "0", "--save", str(tmp_path / "base")]
    train(load_config(pretrain), stream=io.StringIO())
    log = io.StringIO()
    result = train(load_config(_argv(sft_prefix, sentencepiece_model, tmp_path, "--sft", "--train-iters", "40",
                                     "--lr", "3e-3", "--lr-warmup-iters", "4", "--eval-interval", "20",
                                     "--eval-iters", "1", "--log-interval", "20", "--load", str(tmp_path / "base"),
                                     "--finetune", "--save", str(tmp_path / "worker"))), stream=log)
    assert "loaded weights from" in log.getvalue() and sorted(result.losses)[0] == 1
    assert sum(result.losses[s] for s in range(36, 41)) < sum(result.losses[s] for s in range(1, 6)) - 1.0
    assert "longer than --seq-length" not in log.getvalue()
    assert result.evaluations[40] < result.evaluations[20]


def test_sft_flag_errors(data_prefix: str, sft_prefix: str, sentencepiece_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--reset-attention-mask does not apply to --sft"):
        load_config(_argv(sft_prefix, sentencepiece_model, tmp_path, "--sft", "--reset-attention-mask",
                          "--train-iters", "2", "--lr", "1e-3"))
    with pytest.raises(DataFormatError, match="loss_mask"):  # pre-training data has no loss mask
        train(load_config(_argv(data_prefix, sentencepiece_model, tmp_path, "--sft", "--train-iters", "2",
                                "--lr", "1e-3")), stream=io.StringIO())
