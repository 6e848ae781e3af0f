"""The two ways the rewrite stage runs the worker: in this process, or on OpenAI-compatible servers.

Both take a lazy stream of :class:`PieceRequest` (one piece of one document, as chat messages) and call
``on_result`` with a :class:`PieceResult` for each, in any order, in the caller's thread.

* :class:`LocalBackend` loads a megalign checkpoint (or takes a model already loaded, e.g. from a Hugging Face
  folder by the shared model flags) and generates with the KV-cache
  :class:`~megalign.inference.generation.Generator`, a window of pieces at a time (sorted by length inside
  the window, so batches hold similar lengths). Each piece may get at most
  ``ceil(max_new_tokens_ratio x its prompt tokens) + 16`` new tokens, and at most ``max_new_tokens`` when
  given (capped by the model's positions).
* :class:`ServerBackend` sends chat-completion requests through :class:`~megalign.align.openai_client.ChatClient`
  (bounded concurrency over one or more servers, retries with backoff, fatal errors stop the stage).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from megalign.align.openai_client import ChatClient, ClientConfig, CompletionRequest, CompletionResult

if TYPE_CHECKING:
    from megalign.inference.model_loading import LoadedModel

__all__ = ["LocalBackend", "PieceRequest", "PieceResult", "ServerBackend"]

Messages = List[Dict[str, str]]


@dataclass
class PieceRequest:
    """Rewrite one piece: ``key`` identifies it (record id, piece index), ``messages`` is the worker's chat."""

    key: Tuple[str, int]
    messages: Messages


@dataclass
class PieceResult:
    """A piece's rewrite (``text``) or why there is none (``reason``, ``message``)."""

    key: Tuple[str, int]
    text: Optional[str]
    finish_reason: Optional[str] = None
    reason: Optional[str] = None
    message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


OnResult = Callable[[PieceResult], None]
PieceValidator = Callable[[Tuple[str, int], str], Optional[str]]
# the client's reasons that mean the same as a validation reason
_REASONS = {"empty_reply": "empty"}


class LocalBackend:
    """Generates in this process with ``load``: a megalign checkpoint directory (loaded as ``dtype`` on
    ``device`` with the given tokenizer), or a LoadedModel (those options then do not apply)."""

    def __init__(
        self,
        load: Union[str, Path, "LoadedModel"],
        *,
        dtype: str = "fp32",
        device: str = "cpu",
        tokenizer_type: Optional[str] = None,
        tokenizer_model: Optional[str] = None,
        batch_size: int = 8,
        max_new_tokens_ratio: float = 1.5,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        add_bos: bool = False,
        window: Optional[int] = None,
    ) -> None:
        from megalign.inference.generation import GenerationParams
        from megalign.inference.model_loading import LoadedModel, load_model

        if isinstance(load, LoadedModel):
            self.loaded = load
        else:
            self.loaded = load_model(
                load, dtype=dtype, device=device, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model
            )
        self.generator = self.loaded.generator(max_batch_size=batch_size, add_bos=add_bos)
        self.params = GenerationParams(
            max_new_tokens=max_new_tokens,
            max_new_tokens_ratio=max_new_tokens_ratio,
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
        )
        self.window = window or 4 * batch_size
        self.name = str(self.loaded.path.parent if self.loaded.path.name.startswith("iter_") else self.loaded.path)

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer.encode(text))

    def max_piece_tokens(self, empty_prompt_messages: Messages) -> int:
        """The largest piece (in tokens) whose prompt and longest allowed rewrite fit the model's positions."""
        from megalign.inference.generation import chat_prompt

        overhead = len(self.generator.encode(chat_prompt(self.loaded.tokenizer, empty_prompt_messages)))
        budget = self.generator.max_length - overhead - self.params.ratio_slack
        ratio = self.params.max_new_tokens_ratio or 0.0  # no ratio: the rewrite may use the whole budget
        return max(1, int(budget / (1.0 + ratio)) - 1)

    def run(
        self, requests: Iterable[PieceRequest], on_result: OnResult, validator: Optional[PieceValidator] = None
    ) -> Dict[str, Any]:
        """Generate every request; ``validator`` is not used (asking again gives the same greedy rewrite)."""
        from megalign.inference.generation import PromptTooLongError, chat_prompt

        totals = {"pieces": 0, "prompt_tokens": 0, "completion_tokens": 0}
        source = iter(requests)
        while True:
            window = list(itertools.islice(source, self.window))
            if not window:
                return totals
            prompts = [chat_prompt(self.loaded.tokenizer, r.messages) for r in window]
            try:
                results = self.generator.generate(prompts, self.params)
            except PromptTooLongError as exc:  # should not happen (pieces are sized to fit): fail that piece only
                bad = window[exc.index]
                on_result(PieceResult(bad.key, None, reason="too_long", message=str(exc)))
                rest = window[: exc.index] + window[exc.index + 1 :]
                source = itertools.chain(rest, source)
                continue
            for request, result in zip(window, results):
                totals["pieces"] += 1
                totals["prompt_tokens"] += result.prompt_tokens
                totals["completion_tokens"] += result.completion_tokens
                on_result(
                    PieceResult(
                        request.key,
                        result.text,
                        result.finish_reason,
                        prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                    )
                )


class ServerBackend:
    """Sends the pieces to OpenAI-compatible servers (see the module doc)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.name = config.model

    def run(
        self, requests: Iterable[PieceRequest], on_result: OnResult, validator: Optional[PieceValidator] = None
    ) -> Dict[str, Any]:
        """Send every request; a reply failing ``validator(key, text)`` is asked for again (retry_invalid)."""

        def completion_requests() -> Iterable[CompletionRequest]:
            for request in requests:
                check = None
                if validator is not None:
                    check = functools.partial(validator, request.key)
                yield CompletionRequest(key=request.key, messages=request.messages, validator=check)

        def finished(result: CompletionResult) -> None:
            reason = None
            if not result.ok:  # the validator's own reason (e.g. lost_numbers) rather than "invalid_reply"
                reason = _REASONS.get(result.reason or "", result.reason)
                if result.reason == "invalid_reply" and result.detail:
                    reason = result.detail
            on_result(
                PieceResult(
                    result.key,
                    result.text if result.ok else None,
                    result.finish_reason,
                    reason,
                    result.message,
                    result.prompt_tokens,
                    result.completion_tokens,
                )
            )

        with ChatClient(self.config) as client:
            return client.run_many(completion_requests(), finished, progress="rewrite: requests")
