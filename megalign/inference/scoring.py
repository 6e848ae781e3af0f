"""Per-document perplexity under a model: ``exp(mean negative log-likelihood of the document's tokens)``.

A document of ``n`` tokens ``t_0 .. t_{n-1}`` (``tokenizer.encode``, plus a leading BOS when ``add_bos``)
has ``n - 1`` predicted tokens ``t_1 .. t_{n-1}``, each scored by ``-log p(t_i | t_<i)`` over the
tokenizer's vocabulary (the model's padding rows are left out of the softmax, as in the exported HF
model). A document with no predicted token (one token, or empty) gets ``ppl=None, tokens=0``.

A document fits one forward pass when its ``n - 1`` input tokens fit the model's ``max_length`` positions;
longer documents are scored in windows: the predicted tokens are taken in consecutive blocks of ``stride``
tokens (default and at most ``max_length``), and each block is scored by one forward pass over the
``max_length`` tokens just before each of its tokens' positions, i.e. the inputs ``[end - 1 - max_length,
end - 1)`` for a block ending at token ``end`` (fewer at the document start). So every predicted token is
scored exactly once, with at least ``max_length - stride`` tokens of context (its whole context when the
document fits one window); a smaller stride gives more context per token at more compute. With the
default stride the windows do not overlap: the first token predicted in each window sees one token.

Windows of all documents are sorted by length and batched up to ``batch_tokens`` tokens per forward pass
(right-padded: with causal attention the padding never affects the real tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megalign.data.tokenizers import Tokenizer
from megalign.errors import ConfigError, TokenizerError
from megalign.utils.progress import ProgressMeter

if TYPE_CHECKING:
    from megalign.model.decoder import GPTModel

__all__ = ["DocumentScore", "PerplexityScorer", "score_windows"]


@dataclass(frozen=True)
class DocumentScore:
    """``ppl``: exp of the mean NLL (None when ``tokens`` is 0); ``tokens``: predicted tokens; ``nll``: their
    summed negative log-likelihood in nats."""

    ppl: Optional[float]
    tokens: int
    nll: float


def score_windows(length: int, max_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """Windows ``(start, end, first_predicted)`` over a document of ``length`` tokens (see the module doc):
    the forward pass reads tokens ``[start, end - 1)`` (at most ``max_length``) and scores the predictions of
    tokens ``[first_predicted, end)``."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= max_length:
        raise ConfigError(f"scoring: stride={stride!r} must be an integer in [1, max_length={max_length}]")
    windows = []
    for first in range(1, length, stride):
        end = min(first + stride, length)
        windows.append((max(0, end - 1 - max_length), end, first))
    return windows


def _width(window: Tuple[int, int, int, int]) -> int:
    """Input tokens of a ``(document, start, end, first)`` window."""
    return window[2] - 1 - window[1]


class PerplexityScorer:
    """Scores documents with ``model`` (a whole GPTModel in one process) and ``tokenizer`` (see the module doc)."""

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer,
        max_length: Optional[int] = None,
        stride: Optional[int] = None,
        add_bos: bool = False,
        batch_tokens: int = 4096,
    ) -> None:
        if not model.stage.first or not model.stage.last:
            raise ConfigError("PerplexityScorer needs the whole model in this process (no pipeline stages)")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary of "
                f"{model.config.vocab_size}"
            )
        if add_bos and tokenizer.bos is None:
            raise TokenizerError(f"add_bos: tokenizer {tokenizer.tokenizer_type} has no BOS token")
        self.model, self.tokenizer, self.add_bos = model, tokenizer, add_bos
        self.max_length = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.stride = self.max_length if stride is None else stride
        score_windows(0, self.max_length, self.stride)  # validates the stride
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ConfigError(f"scoring: batch_tokens={batch_tokens!r} must be a positive integer")
        self.batch_tokens = batch_tokens
        self.device = next(model.parameters()).device

    def score(self, texts: Sequence[str], progress: bool = False) -> List[DocumentScore]:
        """Scores of ``texts``, in order."""
        if isinstance(texts, str):
            raise TypeError("PerplexityScorer.score takes a list of texts, not one string")
        documents = self.tokenizer.encode_batch(list(texts))
        if self.add_bos:
            bos = self.tokenizer.bos
            assert bos is not None  # __init__ refuses add_bos without a BOS token
            documents = [[bos] + ids for ids in documents]
        return self.score_ids(documents, progress)

    def score_ids(self, documents: Sequence[Sequence[int]], progress: bool = False) -> List[DocumentScore]:
        """Scores of token-id documents, in order."""
        docs = [torch.as_tensor(list(ids), dtype=torch.long) for ids in documents]
        vocab = self.tokenizer.vocab_size
        for index, ids in enumerate(docs):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise TokenizerError(f"document {index}: token ids must be in 0..{vocab - 1}")
        windows = [
            (doc, *window)
            for doc, ids in enumerate(docs)
            for window in score_windows(len(ids), self.max_length, self.stride)
        ]
        windows.sort(key=_width)
        nll = [0.0] * len(docs)
        counts = [0] * len(docs)
        meter = ProgressMeter("score", total=len(windows), unit="windows", enabled=progress)
        with torch.inference_mode():
            start = 0
            while start < len(windows):
                stop = start + 1  # widths grow along the list: the batch's last window sets its width
                while stop < len(windows) and (stop + 1 - start) * _width(windows[stop]) <= self.batch_tokens:
                    stop += 1
                batch = windows[start:stop]
                for (doc, _, end, first), value in zip(batch, self._score_batch(docs, batch)):
                    nll[doc] += value
                    counts[doc] += end - first
                meter.update(windows=len(batch), tokens=sum(_width(w) for w in batch))
                start = stop
        meter.close()
        return [
            DocumentScore(ppl=math.exp(total / count) if count else None, tokens=count, nll=total)
            for total, count in zip(nll, counts)
        ]

    def _score_batch(self, docs: List[torch.Tensor], batch: List[Tuple[int, int, int, int]]) -> List[float]:
        """Summed NLL of the scored tokens of each window in ``batch`` (one forward pass)."""
        width = max(_width(window) for window in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (doc, start, end, first) in enumerate(batch):
            ids = docs[doc]
            tokens[row, : end - 1 - start] = ids[start : end - 1]
            labels[row, first - 1 - start : end - 1 - start] = ids[first:end]  # input position i predicts token i + 1
        logits = self.model(tokens.to(self.device))[..., : self.tokenizer.vocab_size].float()
        losses = F.cross_entropy(logits.transpose(1, 2), labels.to(self.device), ignore_index=-100, reduction="none")
        return losses.sum(dim=1).tolist()
