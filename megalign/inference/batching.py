"""Dynamic batching for the server: requests that arrive together are generated in one batch.

HTTP handler threads submit prompts and wait; one worker thread owns the model. It takes the oldest
waiting request, then every other waiting request with the same generation settings, up to
``max_batch_size`` prompts, waiting at most ``max_wait_seconds`` for a batch to fill, and generates them
together with the :class:`~megalign.inference.generation.Generator`. Greedy results equal generating the
request alone up to floating-point rounding. Seeded sampling is reproducible: a request with a ``seed``
and a temperature above 0 is generated on its own, since the generator seeds each prompt's sampler from
the seed and the prompt's position in the batch.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megalign.inference.generation import Completion, GenerationParams, Generator, chat_prompt

__all__ = ["BatchingEngine", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused a conversation (e.g. an unknown role)."""


@dataclass
class _Request:
    prompts: List[str]
    params: GenerationParams
    future: Future = field(default_factory=Future)


class BatchingEngine:
    """Serialises generation on one worker thread and batches concurrent requests (see the module doc)."""

    def __init__(self, generator: Generator, max_batch_size: int = 16, max_wait_seconds: float = 0.01) -> None:
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self._queue: List[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="megalign-generate", daemon=True)
        self._thread.start()

    def submit(self, prompts: Sequence[str], params: GenerationParams) -> Future:
        """Queue ``prompts``; the future's result is their completions, in order."""
        request = _Request(list(prompts), params)
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> List[Completion]:
        """Submit and wait."""
        return self.submit(prompts, params).result()

    def chat(self, conversations: Sequence[List[Dict[str, str]]], params: GenerationParams) -> List[Completion]:
        """Complete each conversation's assistant reply (the tokenizer's chat template, as in SFT training)."""
        prompts = []
        for messages in conversations:
            try:
                prompts.append(chat_prompt(self.generator.tokenizer, messages))
            except Exception as exc:  # jinja errors, unknown roles: the caller's conversation is at fault
                raise ChatTemplateError(f"cannot apply the chat template: {exc}") from None
        return self.generate(prompts, params)

    def close(self) -> None:
        """Stop the worker after the queued requests."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _take_batch(self) -> Optional[List[_Request]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait_seconds
            while True:
                first = self._queue[0]
                if first.params.seed is not None and not first.params.greedy:
                    batch = [first]
                else:
                    batch = [r for r in self._queue if r.params == first.params]
                size = sum(len(r.prompts) for r in batch)
                remaining = deadline - time.monotonic()
                if size >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            chosen: List[_Request] = []
            total = 0
            for request in batch:
                if chosen and total + len(request.prompts) > self.max_batch_size:
                    break
                chosen.append(request)
                total += len(request.prompts)
            for request in chosen:
                self._queue.remove(request)
            return chosen

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            prompts = [p for request in batch for p in request.prompts]
            try:
                results = self.generator.generate(prompts, batch[0].params)
            except Exception as exc:  # reported to each waiting request; a lone request gets its own error
                if len(batch) > 1:
                    for request in batch:  # retry alone so one bad prompt does not fail the others
                        try:
                            request.future.set_result(self.generator.generate(request.prompts, request.params))
                        except Exception as own:
                            request.future.set_exception(own)
                else:
                    batch[0].future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for request in batch:
                request.future.set_result(results[start : start + len(request.prompts)])
                start += len(request.prompts)
