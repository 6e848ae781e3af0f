"""Generation settings and the choice of the next token: greedy, or sampling with temperature, top-k, top-p.

Sampling is reproducible: every prompt draws from its own ``torch.Generator`` seeded from
``GenerationParams.seed`` and the prompt's index in the request (:func:`row_seed`), so a prompt's sample
depends on the seed, its index and itself, not on which other prompts share its batch or when they finish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from megalign.errors import ConfigError

__all__ = ["GenerationParams", "next_tokens", "row_seed"]


@dataclass(frozen=True)
class GenerationParams:
    """How to generate (see :meth:`max_new_tokens_for` for the length rule).

    ``temperature`` 0 means greedy (argmax); above 0, sampling from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose probability
    reaches ``top_p`` (1.0: all). ``stop``: strings that end a completion when they appear in its decoded
    text (the text is cut before the first one). ``stop_token_ids``: token ids that end a completion (None:
    the tokenizer's end-of-document / end-of-sequence / end-of-turn ids; ``()``: none).
    """

    max_new_tokens: Optional[int] = 256
    max_new_tokens_ratio: Optional[float] = None
    ratio_slack: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is None and self.max_new_tokens_ratio is None:
            raise ConfigError("generation: give max_new_tokens or max_new_tokens_ratio (or both)")
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 0):
            raise ConfigError(f"generation: max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        ratio = self.max_new_tokens_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0
        ):
            raise ConfigError(f"generation: max_new_tokens_ratio={ratio!r} must be a positive number")
        if not _is_int(self.ratio_slack) or self.ratio_slack < 0:
            raise ConfigError(f"generation: ratio_slack={self.ratio_slack!r} must be an integer >= 0")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not self.temperature >= 0
            or not math.isfinite(self.temperature)
        ):
            raise ConfigError(f"generation: temperature={self.temperature!r} must be a number >= 0 (0: greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"generation: top_k={self.top_k!r} must be an integer >= 0 (0: no limit)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"generation: top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"generation: seed={self.seed!r} must be an integer")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"generation: stop={self.stop!r} must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            if any(not _is_int(i) or i < 0 for i in self.stop_token_ids):
                raise ConfigError(f"generation: stop_token_ids={self.stop_token_ids!r} must be token ids >= 0")
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0

    def max_new_tokens_for(self, prompt_tokens: int, max_length: int) -> int:
        """The most tokens a prompt of ``prompt_tokens`` tokens may get, in a model of ``max_length`` positions:

        ``min(max_new_tokens, ceil(max_new_tokens_ratio * prompt_tokens) + ratio_slack, max_length - prompt_tokens)``,
        leaving out the terms whose setting is None (never below 0).
        """
        limits = [max_length - prompt_tokens]
        if self.max_new_tokens is not None:
            limits.append(self.max_new_tokens)
        if self.max_new_tokens_ratio is not None:
            # round first so that 1.1 * 10 = 11.000000000000002 does not become 12
            limits.append(math.ceil(round(self.max_new_tokens_ratio * prompt_tokens, 9)) + self.ratio_slack)
        return max(0, min(limits))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def row_seed(seed: int, index: int) -> int:
    """The seed of the generator of the ``index``-th prompt of a request seeded ``seed``."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` ``[batch, vocab]`` with everything outside top-k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token is always kept)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, params: GenerationParams, generators: Optional[Sequence[Optional[torch.Generator]]] = None
) -> torch.Tensor:
    """The next token ``[batch]`` of each row of ``logits`` ``[batch, vocab]``: argmax when greedy, else one
    draw per row from the filtered, tempered distribution with that row's generator."""
    if params.greedy:  # max's indices: argmax's (the first maximum), and faster on CPU
        return logits.max(dim=-1).indices
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("next_tokens: sampling needs one torch.Generator per row")
    probs = torch.softmax(_filter_logits(logits.float() / params.temperature, params.top_k, params.top_p), dim=-1)
    return torch.cat(
        [torch.multinomial(probs[row], 1, generator=generator) for row, generator in enumerate(generators)]
    )
