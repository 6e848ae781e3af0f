"""Hugging Face conversion against a real parallel job: an imported Llama-3-style model run at TP 2 x PP 2 on
gloo ranks gives transformers' logits, greedy generation matches ``generate``, and a model trained at TP 2 x
PP 2 then exported scores a training batch in transformers as megalign does."""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional

import numpy
import pytest
import torch
import torch.nn.functional as F

from megalign.config import TrainingConfig, load_config
from megalign.convert import convert_hf_to_megalign, convert_megalign_to_hf
from megalign.data.indexed_dataset import IndexedDataset
from megalign.data.tokenizers import build_tokenizer
from megalign.model import GPTModel
from megalign.config.model import ModelConfig, ModelOptions, preset, to_hf_config
from megalign.ops.rotary import RopeScaling
from megalign.parallel import initialize_parallel
from megalign.parallel.pipeline import run_schedule, schedule_for
from megalign.training.checkpoint_io import CheckpointIO
from megalign.checkpoint.storage import Checkpoint, load_checkpoint
from megalign.training.model_chunks import ModelChunks
from megalign.training.trainer import train

transformers = pytest.importorskip("transformers")

VOCAB = 200  # padded to 256 (128 x TP 2) by the import
LLAMA3 = preset("tiny", vocab_size=VOCAB, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
BATCH, SEQ = 2, 16


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):
    """(random HF Llama-3-style model, its import at TP 2 / PP 2)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(LLAMA3),
                                                                   attn_implementation="eager")).eval()
    with torch.no_grad():  # norms are 1 at init: perturb every weight so that a wrong mapping shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_dir = tmp_path_factory.mktemp("hf_llama3")
    model.save_pretrained(hf_dir)
    save = tmp_path_factory.mktemp("imported") / "ckpt"
    convert_hf_to_megalign(hf_dir, save, 2, 2, progress=False)
    return model, save


def _single_process_model(checkpoint: Checkpoint, config: ModelConfig) -> GPTModel:
    """The whole model in this process (TP 1 / PP 1), weights read from ``checkpoint`` at whatever layout."""
    state = initialize_parallel()
    chunks = ModelChunks(config, ModelOptions(), state, 1)
    CheckpointIO(chunks, state, log=lambda _: None).load_weights(checkpoint)
    return chunks.chunks[0].eval()


def _forward_rank(rank: int, world: int, save: str, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits of ``tokens`` from the checkpoint over 2 pipeline stages x 2 tensor ranks (None off the last stage)."""
    state = initialize_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    checkpoint = load_checkpoint(save)
    config = ModelConfig.from_dict(checkpoint.config["model_config"])
    model = ModelChunks(config, ModelOptions(), state, 1)
    CheckpointIO(model, state, log=lambda _: None).load_weights(checkpoint)
    logits: List[torch.Tensor] = []

    def forward_step(chunk: int, x: Optional[torch.Tensor], m: int) -> torch.Tensor:
        out = model.chunks[chunk](tokens, hidden_states=x)
        if not model.chunks[chunk].stage.last:
            return out
        logits.append(out)
        return out.new_zeros(())

    actions = [a for a in schedule_for(model.spec, 1) if a.kind == "F"]
    with torch.no_grad():
        run_schedule(model.spec, actions, forward_step, 1, (BATCH, SEQ, config.hidden_size), torch.float32,
                     torch.device("cpu"), forward_only=True)
    return logits[0] if logits else None


def test_imported_model_at_tp2_pp2_gives_transformers_logits(distributed, imported) -> None:
    hf_model, save = imported
    tokens = _tokens()
    results = distributed(_forward_rank, 4, str(save), tokens)
    last = [r for r in results if r is not None]
    assert len(last) == 2  # the two tensor ranks of the last stage, each with the gathered logits
    with torch.no_grad():
        expected = hf_model(input_ids=tokens).logits
    for logits in last:
        assert logits.shape == (BATCH, SEQ, 256)
        torch.testing.assert_close(logits[..., :VOCAB], expected, rtol=0, atol=1e-5)


def test_greedy_generation_equals_transformers(imported) -> None:
    hf_model, save = imported
    checkpoint = load_checkpoint(save)
    model = _single_process_model(checkpoint, ModelConfig.from_dict(checkpoint.config["model_config"]))
    prompt = _tokens()[:1, :6]
    hf_model.generation_config.eos_token_id = None  # a random model may emit the eos id: always make 8 tokens
    with torch.no_grad():
        expected = hf_model.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=0)
        tokens = prompt
        for _ in range(8):
            logits = model(tokens)[:, -1, :VOCAB]  # the padded rows are not tokens
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert expected.shape == (1, 14)
    assert torch.equal(tokens, expected)


def _train_rank(rank: int, world: int, argv: List[str]) -> None:
    train(load_config(argv), stream=io.StringIO())


def test_model_trained_at_tp2_pp2_exports_with_the_same_loss(distributed, data_prefix: str,
                                                             sentencepiece_model: Path, tmp_path: Path) -> None:
    save, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    argv = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--data-path", data_prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(sentencepiece_model), "--data-cache-path", str(tmp_path / "cache"), "--split", "100,0,0",
            "--seed", "5", "--lr", "5e-3", "--lr-warmup-iters", "1", "--train-iters", "3", "--log-interval", "1",
            "--eval-iters", "0", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--save", str(save)]
    distributed(_train_rank, 4, argv)
    vocab = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model)).vocab_size
    convert_megalign_to_hf(save, hf_dir, dtype="fp32", vocab_size=vocab, progress=False)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()

    checkpoint = load_checkpoint(save)
    assert checkpoint.step == 3 and checkpoint.metadata.parallel["tensor"] == 2
    padded = checkpoint.metadata.tensors["embed_tokens.weight"].shape[0]  # the trainer's padded vocabulary
    # the model shape only: the parallel section would be checked against this single process's world size
    shape_only = {key: value for key, value in checkpoint.config.items() if key != "parallel"}
    config = TrainingConfig.from_dict(shape_only).model_config(vocab_size=padded)
    model = _single_process_model(checkpoint, config)
    assert padded > vocab == hf_model.config.vocab_size

    stream = numpy.concatenate([numpy.asarray(doc, dtype=numpy.int64) for doc in IndexedDataset(data_prefix)[:50]])
    assert stream.size >= 2 * 33
    tokens = torch.from_numpy(stream[:2 * 33].reshape(2, 33)[:, :32].copy())
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(input_ids=tokens, labels=tokens)
    # the trained padded rows are not zero, so the full-vocabulary softmax differs from HF's (which has no
    # padded rows): compare the real-vocabulary logits and the loss with the padded logits masked out
    assert ours[..., vocab:].abs().max() > 0
    torch.testing.assert_close(ours[..., :vocab], theirs.logits, rtol=0, atol=1e-5)
    masked = ours.masked_fill(torch.arange(padded) >= vocab, float("-inf"))
    loss = F.cross_entropy(masked[:, :-1].reshape(-1, padded), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(theirs.loss.item(), rel=1e-4)
