"""Batched in-process text generation with a KV cache: :class:`Generator` over a GPTModel and a megalign Tokenizer.

    generator = Generator(model, tokenizer)
    params = GenerationParams(max_new_tokens_ratio=1.5, temperature=0.7, top_p=0.9, seed=1, stop=("\\n\\n",))
    for result in generator.generate([chat_prompt(tokenizer, messages) for messages in conversations], params):
        print(result.finish_reason, result.completion_tokens, result.text)

How it runs: prompts are sorted by length and taken ``max_batch_size`` at a time; each batch is
left-padded to its longest prompt (the padding kept out of attention by the cache's segment ids, positions
counted from each prompt's first real token), prefilled in one forward pass that keeps only the last
position's logits, then decoded one token per row per step from a preallocated key/value cache, by
:class:`~megalign.inference.fast_decode.FastDecoder` (the model's weights with q/k/v and gate/up fused, few
ops per step) or, with ``fast=False``, the model's own forward with a
:class:`~megalign.model.kv_cache.KVCache`. A row that finishes leaves the batch (its cache rows are
dropped), so long completions do not make finished ones cost compute.

A completion ends with ``finish_reason``:

* ``"stop"``: a stop token was generated (kept in ``token_ids``, left out of ``text``), or a stop string
  appeared in the decoded completion (``text`` is cut before its first occurrence; ``token_ids`` end with
  the token that completed it);
* ``"length"``: it reached its token limit, :meth:`GenerationParams.max_new_tokens_for` of its prompt length
  and the generator's ``max_length`` (the model's positions).

String prompts are encoded with ``tokenizer.encode`` (which adds no BOS; ``add_bos=True`` prepends the
tokenizer's BOS id, which converted Llama-3 models expect); token-id prompts are used as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from megalign.data.tokenizers import END_OF_TURN, Tokenizer
from megalign.errors import ConfigError, MegalignError, TokenizerError
from megalign.inference.fast_decode import FastDecoder, ModelDecoder
from megalign.inference.sampling import GenerationParams, next_tokens, row_seed
from megalign.utils.progress import ProgressMeter

if TYPE_CHECKING:
    from megalign.model.decoder import GPTModel

__all__ = ["Completion", "GenerationParams", "Generator", "PromptTooLongError", "chat_prompt"]

Prompt = Union[str, Sequence[int]]


class PromptTooLongError(MegalignError, ValueError):
    """A prompt does not fit the model's positions (``index``: its position in the request)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Completion:
    """One prompt's result (see the module doc for ``finish_reason``)."""

    text: str
    token_ids: List[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def chat_prompt(tokenizer: Tokenizer, messages: List[Dict[str, str]]) -> str:
    """The prompt text of a conversation, ending where the assistant's reply starts: the tokenizer's chat
    template with the generation prompt (the layout SFT training used, megalign.data.sft)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def default_stop_token_ids(tokenizer: Tokenizer) -> Tuple[int, ...]:
    """End-of-document, end-of-sequence and (when the tokenizer has it as one token) end-of-turn ids."""
    ids = {tokenizer.eod, tokenizer.eos, tokenizer.special_tokens.get(END_OF_TURN)}
    return tuple(sorted(i for i in ids if i is not None and 0 <= i < tokenizer.vocab_size))


class _StopStrings:
    """Detects stop strings in a growing completion by decoding only its tail.

    The tail is the last ``4 * longest + 8`` tokens: a token decodes to at least one character except byte
    pieces of a multi-byte character (at most 4 per character), so a stop string that the newest token
    completed lies inside it, clear of the tail's possibly garbled first character.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 8

    def found(self, ids: List[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(ids[-self.window :])
        return any(stop in tail for stop in self.stops)

    def cut(self, text: str) -> str:
        """``text`` up to the first occurrence of any stop string."""
        positions = [p for p in (text.find(stop) for stop in self.stops) if p >= 0]
        return text[: min(positions)] if positions else text


@dataclass
class _Row:
    """A prompt being completed."""

    index: int
    prompt: List[int]
    limit: int
    generator: Optional[torch.Generator]  # None when decoding greedily
    completion: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None


class Generator:
    """Generates completions of prompts with ``model`` (a whole GPTModel in one process) and ``tokenizer``.

    ``max_length``: the model's positions (prompt + completion), default ``max_position_embeddings``.
    ``max_batch_size``: prompts decoded together. The logits of ids at or above ``tokenizer.vocab_size``
    (the model's vocabulary padding) are never chosen. ``stop_token_ids``: the stop ids used when
    :class:`GenerationParams` gives none (default: :func:`default_stop_token_ids` of the tokenizer).
    ``fast``: run on :class:`~megalign.inference.fast_decode.FastDecoder` (fused inference-only weights, fewer
    ops per step; the default) rather than the model's own cached forward (same results up to float rounding).
    """

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer,
        max_length: Optional[int] = None,
        max_batch_size: int = 16,
        add_bos: bool = False,
        stop_token_ids: Optional[Sequence[int]] = None,
        fast: bool = True,
    ) -> None:
        if not model.stage.first or not model.stage.last:
            raise ConfigError("Generator needs the whole model in this process (no pipeline stages)")
        if model.context.tensor_model_parallel_size != 1:
            raise ConfigError("Generator runs in one process: load the model with tensor parallel size 1")
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise TokenizerError(
                f"tokenizer {tokenizer.tokenizer_type} ({tokenizer.model_path}) has "
                f"{tokenizer.vocab_size} tokens, more than the model's vocabulary of {vocab}; "
                "was the model trained with another tokenizer?"
            )
        if add_bos and tokenizer.bos is None:
            raise TokenizerError(
                f"add_bos: tokenizer {tokenizer.tokenizer_type} ({tokenizer.model_path}) has no BOS token"
            )
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"Generator: max_batch_size={max_batch_size!r} must be a positive integer")
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_batch_size, self.add_bos = max_batch_size, add_bos
        self.vocab_size = tokenizer.vocab_size
        self.stop_token_ids = tuple(default_stop_token_ids(tokenizer) if stop_token_ids is None else stop_token_ids)
        self.device = next(model.parameters()).device
        self.fast = fast

    def decoder(self) -> Union[FastDecoder, ModelDecoder]:
        """The decoder the next batch runs on: a :class:`FastDecoder` over the model's current weights (built
        once per model and reused while they are unchanged), or the model's own cached forward when ``fast``
        is False, or for the Megatron options FastDecoder does not compute (--apply-layernorm-1p norms,
        --rotary-seq-len-interpolation-factor)."""
        config = self.model.config
        if not self.fast or config.apply_layernorm_1p or config.rotary_interpolation_factor is not None:
            return ModelDecoder(self.model, self.vocab_size)
        return FastDecoder.for_model(self.model, self.vocab_size, self.max_length)

    def encode(self, prompt: Prompt) -> List[int]:
        """Token ids of a prompt (string prompts encoded, with BOS when ``add_bos``)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not self.add_bos:
                return ids
            bos = self.tokenizer.bos
            assert bos is not None  # __init__ refuses add_bos without a BOS token
            return [bos] + ids
        ids = [int(i) for i in prompt]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TokenizerError(
                f"prompt token id {bad} is outside the tokenizer's vocabulary (0..{self.vocab_size - 1})"
            )
        return ids

    def generate(
        self, prompts: Sequence[Prompt], params: GenerationParams = GenerationParams(), progress: bool = False
    ) -> List[Completion]:
        """Complete every prompt (strings or token-id lists); results in the order of ``prompts``.

        Raises PromptTooLongError (naming the prompt) when a prompt is empty or has ``max_length`` tokens or
        more, before generating anything.
        """
        if isinstance(prompts, (str, bytes)):
            raise TypeError("Generator.generate takes a list of prompts, not one string")
        rows = [self._row(index, self.encode(prompt), params) for index, prompt in enumerate(prompts)]
        meter = ProgressMeter("generate", total=len(rows), unit="prompts", enabled=progress)
        order = sorted(rows, key=lambda row: len(row.prompt))
        stops = _StopStrings(self.tokenizer, params.stop)
        stop_ids = set(self.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        with torch.inference_mode():
            for start in range(0, len(order), self.max_batch_size):
                batch = order[start : start + self.max_batch_size]
                self._generate_batch(batch, params, stop_ids, stops)
                meter.update(prompts=len(batch), tokens=sum(len(row.completion) for row in batch))
        meter.close()
        return [self._result(row, stop_ids, stops) for row in rows]

    def _row(self, index: int, prompt: List[int], params: GenerationParams) -> _Row:
        if not prompt:
            raise PromptTooLongError(f"prompt {index} is empty; give at least one token (e.g. add_bos=True)", index)
        if len(prompt) >= self.max_length:
            raise PromptTooLongError(
                f"prompt {index} has {len(prompt)} tokens; the model takes {self.max_length} "
                "positions in all, so prompts must be shorter",
                index,
            )
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator(self.device).manual_seed(row_seed(seed, index))
        return _Row(index, prompt, params.max_new_tokens_for(len(prompt), self.max_length), generator, [])

    def _generate_batch(self, rows: List[_Row], params: GenerationParams, stop_ids: set, stops: _StopStrings) -> None:
        """Complete ``rows`` together: prefill, then one token per live row per step."""
        for row in rows:
            if row.limit == 0:
                row.finish_reason = "length"
        live = [row for row in rows if row.finish_reason is None]
        if not live:
            return
        width = max(len(row.prompt) for row in live)
        tokens = torch.full(
            (len(live), width), self.tokenizer.eod if self.tokenizer.eod < self.vocab_size else 0, dtype=torch.long
        )
        valid = torch.zeros(len(live), width, dtype=torch.bool)
        for i, row in enumerate(live):
            tokens[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            valid[i, width - len(row.prompt) :] = True
        decoder = self.decoder()
        state: Any  # DecodeState or _ModelState, the one this decoder's step takes (mypy cannot pair them)
        state, logits = decoder.prefill(
            tokens.to(self.device), valid.to(self.device), width + max(row.limit for row in live)
        )
        while True:
            chosen = next_tokens(logits, params, [row.generator for row in live])
            keep = []
            for i, (row, token) in enumerate(zip(live, chosen.tolist())):
                row.completion.append(token)
                if token in stop_ids or stops.found(row.completion):
                    row.finish_reason = "stop"
                elif len(row.completion) >= row.limit:
                    row.finish_reason = "length"
                else:
                    keep.append(i)
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                state.select(index)
                chosen = chosen[index]
                live = [live[i] for i in keep]
            logits = decoder.step(state, chosen)

    def _result(self, row: _Row, stop_ids: set, stops: _StopStrings) -> Completion:
        ids, finish_reason = row.completion, row.finish_reason
        assert finish_reason is not None  # every row has finished when generate() collects the results
        if finish_reason == "stop" and ids and ids[-1] in stop_ids:
            text = self.tokenizer.decode(ids[:-1])
        else:
            text = self.tokenizer.decode(ids)
            if finish_reason == "stop":
                text = stops.cut(text)
        return Completion(
            text=text,
            token_ids=list(ids),
            finish_reason=finish_reason,
            prompt_tokens=len(row.prompt),
            completion_tokens=len(ids),
        )
