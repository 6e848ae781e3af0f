"""HTTP client for OpenAI-compatible endpoints: the alignment expert (annotate) and workers (rewrite).

Talks to ``POST {base_url}/chat/completions`` (messages) and ``POST {base_url}/completions`` (prompt) of
OpenAI, vLLM, TGI or ``megalign serve``. One `ChatClient` sends over pooled keep-alive connections
(`HttpTransport`, one httpx client per ChatClient, closed by `close()`; proxy variables such as HTTPS_PROXY
and NO_PROXY are honoured), spreads requests over one or more base URLs (least busy first, round-robin among
equals; an endpoint that fails is avoided for a cool-down and the others carry on), bounds concurrency, paces
requests with `RateLimiter`, and retries:

* connection errors, resets and dropped connections (``connection_error``), timeouts (``timeout``), HTTP 429
  (``rate_limited``; Retry-After is honoured), 408/409 and 5xx (``http_NNN``), unparseable JSON or replies
  without choices/content (``malformed_reply``): up to ``max_retries`` retries with full-jitter backoff;
* replies that fail validation (empty: ``empty_reply``, cut off by max_tokens: ``truncated``, rejected by the
  caller's validator: ``invalid_reply``): up to ``retry_invalid`` more attempts;
* other 4xx (400, 401, 403, 404, ...): never retried; 401/403/404 are marked ``fatal`` (configuration errors
  that would fail every request).

A call never raises for endpoint trouble: it returns a `CompletionResult` with ``ok=False``, a short
machine ``reason``, a human ``message`` and the number of ``attempts``. The API key is never logged, never
put in a result, exception or repr, and is redacted from server messages.

Batch use (the stages)::

    with ChatClient(ClientConfig(base_urls=["http://127.0.0.1:8000/v1"], model="worker")) as client:
        client.run_many((CompletionRequest(key=r["id"], messages=[...]) for r in records),
                        on_result=write_record, total=n, progress="rewrite")
        summary["client"] = client.usage()
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from megalign.align.http_transport import HttpReply, HttpTransport, TransportFailure
from megalign.align.rate_limit import (
    Backoff,
    Clock,
    Endpoint,
    EndpointPool,
    RateLimiter,
    Sleep,
    parse_retry_after,
    wait_or_cancel,
)
from megalign.errors import ConfigError, MegalignError
from megalign.utils.progress import ProgressMeter

logger = logging.getLogger(__name__)

Validator = Callable[[str], Optional[str]]
"""A reply check: returns None when the text is acceptable, else a short reason why not."""

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})
_SK_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{6,}")


class EndpointError(MegalignError):
    """An endpoint rejected the configuration (bad key, unknown model or path); raised by `run_many`."""


class Secret:
    """A string that never shows itself in repr/str/format; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass
class ClientConfig:
    """Where and how to call an OpenAI-compatible endpoint.

    api_key: explicit key, else read from the environment variable `api_key_env` (none: no
    Authorization header, as for a local vLLM). timeout: seconds for a whole attempt (connect, send,
    wait, read; megalign.align.http_transport says exactly how). max_retries: retries of transport/server
    failures; retry_invalid: extra attempts for replies that fail validation. backoff_base/backoff_max:
    full-jitter backoff; seed makes it reproducible. endpoint_cooldown: seconds a failing endpoint is
    avoided (doubling per consecutive failure, capped at 60). requests_per_minute/tokens_per_minute:
    client-side pacing (None: off).
    temperature/max_tokens/top_p/stop and extra_body: generation parameters sent with every request.
    """

    base_urls: Sequence[str]
    model: str
    api_key: Union[str, Secret, None] = field(default=None, repr=False)
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 5
    retry_invalid: int = 1
    accept_truncated: bool = False
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    endpoint_cooldown: float = 2.0
    seed: Optional[int] = None
    max_concurrency: int = 8
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    temperature: Optional[float] = 0.0
    max_tokens: Optional[int] = None
    top_p: Optional[float] = None
    stop: Optional[Sequence[str]] = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.base_urls, str):
            self.base_urls = [self.base_urls]
        self.base_urls = [u.rstrip("/") for u in self.base_urls]
        if isinstance(self.api_key, str):
            self.api_key = Secret(self.api_key) if self.api_key else None
        if not self.base_urls:
            raise ConfigError("--base-url: at least one endpoint URL is required")
        for url in self.base_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"--base-url {url!r}: expected http(s)://HOST[:PORT]/PATH, e.g. http://127.0.0.1:8000/v1"
                )
        if not self.model:
            raise ConfigError("--model: a model name is required (the name the endpoint serves)")
        for name, minimum in (("max_concurrency", 1), ("max_retries", 0), ("retry_invalid", 0)):
            if int(getattr(self, name)) < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or unset, got {value}")

    def resolved_api_key(self) -> Optional[Secret]:
        """The explicit key, else the one in the environment variable `api_key_env`, else None."""
        if isinstance(self.api_key, Secret):
            return self.api_key
        value = os.environ.get(self.api_key_env) if self.api_key_env else None
        return Secret(value) if value else None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe settings for manifests and summaries; the key itself is left out."""
        out = {k: v for k, v in vars(self).items() if k != "api_key"}
        out["base_urls"] = list(self.base_urls)
        out["stop"] = list(self.stop) if self.stop else None
        out["extra_body"] = dict(self.extra_body)
        out["api_key_set"] = self.resolved_api_key() is not None
        return out


@dataclass
class CompletionRequest:
    """One call: chat `messages` (-> /chat/completions) or a raw `prompt` (-> /completions).

    key: the caller's record id, handed back in the result. params: per-request overrides of the
    generation parameters (temperature, max_tokens, ...). validator: overrides the client's.
    """

    key: Any = None
    messages: Optional[Sequence[Mapping[str, Any]]] = None
    prompt: Optional[str] = None
    params: Mapping[str, Any] = field(default_factory=dict)
    validator: Optional[Validator] = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"request {self.key!r}: give exactly one of messages= or prompt=")


@dataclass
class CompletionResult:
    """What a call produced. ok=False carries `reason` (machine) and `message` (human)."""

    key: Any
    ok: bool
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    reason: Optional[str] = None
    message: str = ""
    detail: Optional[str] = None
    fatal: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    endpoint: Optional[str] = None
    elapsed: float = 0.0


@dataclass
class _Reply:
    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Failure:
    reason: str
    message: str
    retryable: bool
    retry_after: Optional[float] = None
    fatal: bool = False
    endpoint_fault: bool = False


class UsageTotals:
    """Thread-safe counters for the stage summary (`as_dict`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.succeeded = self.failed = self.attempts = self.retries = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.failures: Dict[str, int] = {}
        self.retry_reasons: Dict[str, int] = {}
        self.endpoints: Dict[str, Dict[str, int]] = {}

    def attempt(self, endpoint: str, error: Optional[str]) -> None:
        with self._lock:
            self.attempts += 1
            stats = self.endpoints.setdefault(endpoint, {"attempts": 0, "errors": 0})
            stats["attempts"] += 1
            stats["errors"] += error is not None

    def retry(self, reason: str) -> None:
        with self._lock:
            self.retries += 1
            self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + 1

    def finish(self, result: CompletionResult) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
            if result.ok:
                self.succeeded += 1
            else:
                self.failed += 1
                self.failures[result.reason or "unknown"] = self.failures.get(result.reason or "unknown", 0) + 1

    def as_dict(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "attempts": self.attempts,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "failures": dict(self.failures),
                "retry_reasons": dict(self.retry_reasons),
                "endpoints": {url: dict(stats) for url, stats in self.endpoints.items()},
            }


class ChatClient:
    """Calls an OpenAI-compatible API with retries, pacing, bounded concurrency and usage totals.

    `validator` (function(text) -> None or a reason) is the default reply check for every request.
    Thread-safe: `execute` may be called from many threads; at most `max_concurrency` HTTP attempts
    are in flight at once across all of them. Connections are pooled and kept alive until `close()`
    (or the end of a `with` block). `clock` (monotonic seconds) and `sleep` (a function of seconds;
    None: real waits that wake on cancel) drive backoff, rate-limit waits, endpoint cool-downs and
    `elapsed`; tests inject fakes. Per-attempt network timeouts always run on the real clock.
    """

    def __init__(
        self,
        config: ClientConfig,
        validator: Optional[Validator] = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Optional[Sleep] = None,
    ) -> None:
        self.config = config
        self.validator = validator
        self._api_key = config.resolved_api_key()
        self._clock = clock
        self._sleep = sleep
        self._pool = EndpointPool(config.base_urls, config.endpoint_cooldown, clock)
        self._limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute, clock=clock, sleep=sleep)
        self._backoff = Backoff(config.backoff_base, config.backoff_max, config.seed)
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._closed = threading.Event()
        self.totals = UsageTotals()
        # + 2: list_models / check_endpoints run outside the attempt slots
        self._transport = HttpTransport(config.timeout, config.max_concurrency + 2, self._headers())
        if self._api_key is not None:
            for ep in self._pool.endpoints:
                if not ep.https and ep.host not in ("127.0.0.1", "localhost", "::1"):
                    logger.warning("sending the API key over plain HTTP to %s; use https:// or unset the key", ep.url)

    def __repr__(self) -> str:
        return (
            f"ChatClient(base_urls={list(self.config.base_urls)!r}, model={self.config.model!r}, "
            f"api_key={'set' if self._api_key else 'unset'})"
        )

    __str__ = __repr__

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop: calls in backoff or rate-limit waits return 'cancelled' at once; pooled connections close."""
        self._closed.set()
        self._transport.close()

    def usage(self) -> Dict[str, Any]:
        """Totals so far: requests, succeeded, failed, attempts, retries, tokens, failures by reason."""
        return self.totals.as_dict()

    # ---------------------------------------------------------------- single calls

    def chat(self, messages: Sequence[Mapping[str, Any]], key: Any = None, **params: Any) -> CompletionResult:
        """One /chat/completions call (retried as configured)."""
        return self.execute(CompletionRequest(key=key, messages=messages, params=params))

    def complete(self, prompt: str, key: Any = None, **params: Any) -> CompletionResult:
        """One /completions call (retried as configured)."""
        return self.execute(CompletionRequest(key=key, prompt=prompt, params=params))

    def execute(self, request: CompletionRequest, cancel: Optional[threading.Event] = None) -> CompletionResult:
        """Run one request to success or to a failure result; never raises for endpoint trouble."""
        start = self._clock()
        path, payload, estimate = self._payload(request)
        validator = request.validator or self.validator
        result = CompletionResult(key=request.key, ok=False)
        retries = invalid_retries = 0
        last: Optional[Endpoint] = None
        while True:
            if self._cancelled(cancel) or not self._limiter.acquire(estimate, self._cancel_event(cancel)):
                return self._finish(result, start, "cancelled", "cancelled before the request completed")
            endpoint = self._pool.acquire(avoid=last)
            outcome: Union[_Reply, _Failure, None] = None
            try:
                with self._slots:
                    outcome = self._attempt(endpoint, path, payload)
            finally:
                if isinstance(outcome, _Failure):
                    self._pool.release(endpoint, False, outcome.reason, outcome.endpoint_fault, outcome.retry_after)
                else:
                    self._pool.release(endpoint, ok=isinstance(outcome, _Reply))
            if isinstance(outcome, _Failure) and self._cancelled(cancel):
                # closed or cancelled mid-attempt: the failure is ours, not the endpoint's
                return self._finish(result, start, "cancelled", "cancelled before the request completed")
            result.attempts += 1
            result.endpoint = endpoint.url
            last = endpoint
            self.totals.attempt(endpoint.url, outcome.reason if isinstance(outcome, _Failure) else None)
            if isinstance(outcome, _Reply):
                result.prompt_tokens += outcome.prompt_tokens
                result.completion_tokens += outcome.completion_tokens
                self._limiter.settle(estimate, outcome.prompt_tokens + outcome.completion_tokens)
                problem = self._check(outcome, validator)
                if problem is None:
                    result.ok, result.text, result.finish_reason = True, outcome.text, outcome.finish_reason
                    return self._finish(result, start)
                reason, detail = problem
                if invalid_retries < self.config.retry_invalid:
                    invalid_retries += 1
                    self.totals.retry(reason)
                    logger.debug("request %r: %s (%s) from %s; retrying", request.key, reason, detail, endpoint.url)
                    continue
                result.detail, result.finish_reason = detail, outcome.finish_reason
                return self._finish(result, start, reason, f"reply rejected after {result.attempts} attempts: {detail}")
            if not outcome.retryable or retries >= self.config.max_retries:
                result.fatal = outcome.fatal
                message = (
                    outcome.message
                    if not outcome.retryable
                    else (f"gave up after {result.attempts} attempts: {outcome.message}")
                )
                return self._finish(result, start, outcome.reason, message)
            retries += 1
            self.totals.retry(outcome.reason)
            delay = self._backoff.delay(retries)
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, self.config.max_retry_after))
            logger.debug(
                "request %r: %s from %s (attempt %d); retrying in %.2fs",
                request.key,
                outcome.reason,
                endpoint.url,
                result.attempts,
                delay,
            )
            if wait_or_cancel(delay, self._cancel_event(cancel), self._sleep) or self._cancelled(cancel):
                return self._finish(result, start, "cancelled", "cancelled while waiting to retry")

    def _cancel_event(self, cancel: Optional[threading.Event]) -> threading.Event:
        return cancel if cancel is not None else self._closed

    def _cancelled(self, cancel: Optional[threading.Event]) -> bool:
        return self._closed.is_set() or (cancel is not None and cancel.is_set())

    def _finish(
        self, result: CompletionResult, start: float, reason: Optional[str] = None, message: str = ""
    ) -> CompletionResult:
        result.elapsed = self._clock() - start
        if reason is not None:
            result.ok, result.reason, result.message = False, reason, self._redact(message)
            if reason == "cancelled":
                return result  # never delivered by iter_results; the caller reruns it
            # the stages record the reason on the record and count it in their summary: no console line each
            logger.debug("request %r failed: %s: %s", result.key, reason, result.message)
        self.totals.finish(result)
        return result

    def _payload(self, request: CompletionRequest) -> Tuple[str, bytes, int]:
        cfg = self.config
        body: Dict[str, Any] = {"model": cfg.model}
        for name in ("temperature", "max_tokens", "top_p"):
            if getattr(cfg, name) is not None:
                body[name] = getattr(cfg, name)
        if cfg.stop:
            body["stop"] = list(cfg.stop)
        body.update(cfg.extra_body)
        body.update(request.params)
        if request.messages is not None:
            body["messages"] = [dict(m) for m in request.messages]
            text_len = sum(len(str(m.get("content", "")).encode("utf-8")) for m in request.messages)
            path = "/chat/completions"
        else:
            body["prompt"] = request.prompt
            text_len = len(str(request.prompt).encode("utf-8"))
            path = "/completions"
        estimate = text_len // 3 + 1 + int(body.get("max_tokens") or 0)
        return path, json.dumps(body, ensure_ascii=False).encode("utf-8"), estimate

    def _check(self, reply: _Reply, validator: Optional[Validator]) -> Optional[Tuple[str, str]]:
        if not reply.text.strip():
            return "empty_reply", "the reply is empty"
        if reply.finish_reason == "length" and not self.config.accept_truncated:
            return "truncated", "the reply was cut off at max_tokens (finish_reason=length)"
        if validator is not None:
            why = validator(reply.text)
            if why:
                return "invalid_reply", str(why)
        return None

    # ---------------------------------------------------------------- one HTTP attempt

    def _headers(self) -> Dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "megalign-align-client",
        }
        if self._api_key is not None:
            headers["Authorization"] = "Bearer " + self._api_key.reveal()
        return headers

    def _attempt(self, endpoint: Endpoint, path: str, payload: bytes) -> Union[_Reply, _Failure]:
        where = f"{endpoint.url}{path}"
        try:
            reply = self._transport.request("POST", where, payload)
        except TransportFailure as exc:
            return _Failure(exc.reason, exc.message, retryable=True, endpoint_fault=exc.reason != "malformed_reply")
        status, body = reply.status, reply.body
        if status != 200:
            retry_after = parse_retry_after(reply.headers.get("Retry-After"))
            retryable = status in RETRYABLE_STATUS or status >= 500
            reason = "rate_limited" if status == 429 else f"http_{status}"
            message = f"HTTP {status} from {where}: {_server_message(body)}"
            return _Failure(
                reason,
                message,
                retryable,
                retry_after if retryable else None,
                fatal=status in FATAL_STATUS,
                endpoint_fault=status >= 500,
            )
        try:
            return _parse_reply(body, chat=path.endswith("/chat/completions"))
        except ValueError as exc:
            return _Failure("malformed_reply", f"unusable reply from {where}: {exc}", retryable=True)

    def _redact(self, text: str) -> str:
        if self._api_key is not None and self._api_key.reveal():
            text = text.replace(self._api_key.reveal(), "***")
        return _SK_PATTERN.sub("sk-***", text)

    # ---------------------------------------------------------------- batches

    def iter_results(
        self, requests: Iterable[CompletionRequest], cancel: Optional[threading.Event] = None
    ) -> Generator[CompletionResult, None, None]:
        """Run requests on `max_concurrency` threads, yielding results as they finish (any order).

        `requests` is consumed lazily (at most 2 x max_concurrency ahead), so it may be a generator
        over a large corpus. Closing the iterator early (break, exception, KeyboardInterrupt) cancels
        what has not finished: queued requests never start, waiting ones stop, and attempts already
        on the wire end within `timeout`.
        """
        cancel = cancel if cancel is not None else threading.Event()
        window = 2 * self.config.max_concurrency
        source = iter(requests)
        pending: set = set()
        exhausted = finished = False
        executor = ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="megalign-client")
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        request = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.add(executor.submit(self.execute, request, cancel))
                if not pending:
                    finished = True
                    return
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            if not finished:
                cancel.set()
                for future in pending:
                    future.cancel()
            executor.shutdown(wait=finished)

    def run_many(
        self,
        requests: Iterable[CompletionRequest],
        on_result: Optional[Callable[[CompletionResult], None]] = None,
        *,
        total: Optional[int] = None,
        progress: Union[ProgressMeter, str, None] = None,
        stop_on_fatal: bool = True,
    ) -> Dict[str, Any]:
        """Run many requests with bounded concurrency; `on_result(result)` is called as each finishes.

        The callback runs in the calling thread (one at a time, so it needs no lock); results arrive in
        completion order. A failed request is a result with ok=False, not an exception. With
        `stop_on_fatal`, a fatal failure (401/403/404: wrong key, model or URL) cancels the rest and
        raises EndpointError; that request is not passed to `on_result`. KeyboardInterrupt (or an
        exception from `on_result`) cancels the rest and propagates. `progress` is a ProgressMeter or a
        name for a new one (requests/s, tokens/s and, with `total`, an ETA). Returns `usage()`.
        """
        meter = ProgressMeter(progress, total=total, unit="requests") if isinstance(progress, str) else progress
        results = self.iter_results(requests)
        try:
            for result in results:
                if result.fatal and stop_on_fatal:
                    raise EndpointError(
                        f"{result.message} (request {result.key!r}); check --base-url, --model and the API key"
                    )
                if meter is not None:
                    meter.update(requests=1, tokens=result.prompt_tokens + result.completion_tokens)
                if on_result is not None:
                    on_result(result)
        finally:
            results.close()
        if isinstance(progress, str) and meter is not None:
            meter.close()
        return self.usage()

    def map(self, requests: Iterable[CompletionRequest], **kwargs: Any) -> List[CompletionResult]:
        """`run_many` collecting the results into a list (completion order)."""
        out: List[CompletionResult] = []
        self.run_many(requests, out.append, **kwargs)
        return out

    # ---------------------------------------------------------------- endpoint checks

    def list_models(self, base_url: Optional[str] = None) -> List[str]:
        """Model ids served at `base_url` (default: the first); raises EndpointError if unreachable."""
        url = (base_url or self.config.base_urls[0]).rstrip("/")
        try:
            reply: HttpReply = self._transport.request("GET", url + "/models")
        except TransportFailure as exc:
            raise EndpointError(self._redact(f"{url}/models: {exc.reason}: {exc.message}")) from None
        status, body = reply.status, reply.body
        if status != 200:
            raise EndpointError(self._redact(f"{url}/models: HTTP {status}: {_server_message(body)}"))
        try:
            return [str(m["id"]) for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise EndpointError(f"{url}/models: unexpected reply ({exc})") from None

    def check_endpoints(self) -> Dict[str, Optional[str]]:
        """For each base URL: None if it answers /models and serves `model`, else what is wrong."""
        report: Dict[str, Optional[str]] = {}
        for url in self.config.base_urls:
            try:
                models = self.list_models(url)
            except EndpointError as exc:
                report[url] = str(exc)
                continue
            report[url] = (
                None
                if self.config.model in models
                else (f"{url} does not serve model {self.config.model!r} (it serves: {', '.join(models[:10])})")
            )
        return report


def _server_message(body: bytes) -> str:
    """The error message an OpenAI-style server put in its reply body (or the raw text, shortened)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error:
            text = str(error)
    return (text[:300] + "...") if len(text) > 300 else (text or "(empty body)")


def _parse_reply(body: bytes, chat: bool) -> _Reply:
    """Text, finish_reason and usage of a 200 reply; ValueError says what is missing."""
    if not body.strip():
        raise ValueError("empty body")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("the JSON reply is not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("no choices in the reply")
    choice = choices[0]
    if chat:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        raise ValueError("the reply has no message content" if chat else "the reply has no text")
    recorded = data.get("usage")
    usage: Dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    return _Reply(
        text,
        choice.get("finish_reason"),
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
    )


def add_client_arguments(parser: argparse.ArgumentParser, required: bool = True, default_concurrency: int = 8) -> None:
    """The endpoint flags shared by `align annotate` and `align rewrite`."""
    group = parser.add_argument_group("endpoint (OpenAI-compatible API: OpenAI, vLLM, TGI, megalign serve)")
    group.add_argument(
        "--base-url",
        nargs="+",
        required=required,
        metavar="URL",
        help="API base URL(s), e.g. http://127.0.0.1:8000/v1; requests are spread over all of them",
    )
    group.add_argument("--model", required=required, help="model name the endpoint serves")
    group.add_argument(
        "--api-key", default=None, help="API key (prefer --api-key-env: flags are visible to other users in ps)"
    )
    group.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default: OPENAI_API_KEY)",
    )
    group.add_argument("--concurrency", type=int, default=default_concurrency, help="requests in flight at once")
    group.add_argument("--request-timeout", type=float, default=120.0, help="seconds per attempt")
    group.add_argument("--max-retries", type=int, default=5, help="retries per request after errors")
    group.add_argument("--requests-per-minute", type=float, default=None, help="client-side request rate limit")
    group.add_argument("--tokens-per-minute", type=float, default=None, help="client-side token rate limit")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling top-p")
    group.add_argument("--max-tokens", type=int, default=None, help="maximum tokens per reply")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> ClientConfig:
    """A ClientConfig from the flags of `add_client_arguments` (overrides win)."""
    values: Dict[str, Any] = dict(
        base_urls=args.base_url or [],
        model=args.model,
        api_key=args.api_key,
        api_key_env=args.api_key_env,
        max_concurrency=args.concurrency,
        timeout=args.request_timeout,
        max_retries=args.max_retries,
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
    )
    values.update(overrides)
    return ClientConfig(**values)
