"""Per-document perplexity: equals exp(loss) of a direct forward, over the tokenizer's vocabulary only, is
independent of batching, and scores long documents in windows that predict every token exactly once."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megalign.data.tokenizers import build_tokenizer
from megalign.errors import ConfigError, TokenizerError
from megalign.inference.scoring import PerplexityScorer
from megalign.inference.model_loading import checkpoint_scorer
from megalign.inference.scoring import score_windows
from megalign.model import GPTModel, ModelOptions
from megalign.config.model import preset

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(preset("tiny", vocab_size=VOCAB, max_position_embeddings=16),
                    options=ModelOptions(attention_backend="sdpa")).eval()


def _tokenizer(vocab: int = VOCAB):
    """NullTokenizer with ids 0..vocab-1 (text is the ids separated by spaces)."""
    return build_tokenizer("NullTokenizer", vocab_size=vocab - 1)


def _docs(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_ppl_equals_exp_of_the_training_loss(model):
    docs = _docs([12, 5, 17])
    scores = PerplexityScorer(model, _tokenizer()).score([" ".join(map(str, d)) for d in docs])
    with torch.no_grad():
        for doc, score in zip(docs, scores):
            tokens = torch.tensor(doc).unsqueeze(0)
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
            assert score.tokens == len(doc) - 1
            assert score.ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
            assert score.nll == pytest.approx(loss.item() * (len(doc) - 1), rel=1e-5)


def test_vocabulary_padding_is_left_out(model):
    tokenizer = _tokenizer(200)  # the model has 256 rows: 56 of padding
    doc = _docs([9], vocab=200)[0]
    score = PerplexityScorer(model, tokenizer).score_ids([doc])[0]
    with torch.no_grad():
        logits = model(torch.tensor([doc[:-1]]))[0, :, :200]
    expected = F.cross_entropy(logits, torch.tensor(doc[1:]), reduction="sum").item()
    assert score.nll == pytest.approx(expected, rel=1e-5)
    with pytest.raises(TokenizerError, match="token ids must be in 0..199"):
        PerplexityScorer(model, tokenizer).score_ids([[1, 250]])


def test_batching_does_not_change_scores(model):
    docs = _docs([3, 16, 9, 30, 2, 11], seed=1)
    together = PerplexityScorer(model, _tokenizer(), batch_tokens=4096).score_ids(docs)
    one_by_one = [PerplexityScorer(model, _tokenizer(), batch_tokens=1).score_ids([d])[0] for d in docs]
    for a, b in zip(together, one_by_one):
        assert a.tokens == b.tokens and a.nll == pytest.approx(b.nll, rel=1e-5)


@pytest.mark.parametrize("stride", [None, 5])
def test_long_documents_are_scored_in_windows(model, stride):
    doc = _docs([40], seed=2)[0]  # the model has 16 positions
    score = PerplexityScorer(model, _tokenizer(), stride=stride).score_ids([doc])[0]
    step = stride or 16
    expected = 0.0
    with torch.no_grad():
        for first in range(1, 40, step):  # predict tokens [first, end) from the 16 tokens before end - 1
            end = min(first + step, 40)
            start = max(0, end - 1 - 16)
            logits = model(torch.tensor([doc[start:end - 1]]))[0]
            losses = F.cross_entropy(logits, torch.tensor(doc[start + 1:end]), reduction="none")
            expected += losses[first - 1 - start:].sum().item()
    assert score.tokens == 39
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(expected / 39), rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 80), max_length=st.integers(1, 20), data=st.data())
def test_windows_predict_every_token_exactly_once(length, max_length, data):
    stride = data.draw(st.integers(1, max_length))
    predicted = []
    for start, end, first in score_windows(length, max_length, stride):
        assert 0 <= start < first < end <= length
        assert end - 1 - start <= max_length  # the inputs fit the model
        assert first - start >= min(first, max_length - stride + 1)  # at least max_length - stride context
        predicted.extend(range(first, end))
    assert predicted == list(range(1, length))


def test_short_documents_and_options(model):
    tokenizer = _tokenizer()
    scores = PerplexityScorer(model, tokenizer).score(["7", ""])
    assert [(s.ppl, s.tokens) for s in scores] == [(None, 0), (None, 0)]
    with pytest.raises(ConfigError, match="stride"):
        PerplexityScorer(model, tokenizer, stride=17)
    with pytest.raises(TokenizerError, match="no BOS"):
        PerplexityScorer(model, tokenizer, add_bos=True)
    with pytest.raises(TypeError):
        PerplexityScorer(model, tokenizer).score("7 8 9")


def test_checkpoint_scorer(tmp_path, model):
    from megalign.checkpoint.storage import save_checkpoint

    save_checkpoint(tmp_path, 0, model.state_dict(), config={"model_config": model.config.to_dict()}, rng=False)
    with pytest.raises(ConfigError, match="--tokenizer-type"):
        checkpoint_scorer(str(tmp_path))
    tokenizer = _tokenizer()
    with pytest.raises(ConfigError, match="--batch-size"):
        checkpoint_scorer(str(tmp_path), batch_size=0)
    doc = _docs([20], seed=3)[0]
    score = checkpoint_scorer(str(tmp_path), "NullTokenizer", batch_size=2)  # ids 0..255: the model's vocabulary
    expected = PerplexityScorer(model, tokenizer).score_ids([doc])[0].ppl
    got = score([" ".join(map(str, doc)), "5"])
    assert got[0] == pytest.approx(expected, rel=1e-5) and math.isnan(got[1])
