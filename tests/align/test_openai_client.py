"""ChatClient against the fault-injecting loopback server: retries, failures, pacing, batches, secrecy.

Waits (backoff, Retry-After, rate limits, cool-downs) run on an injected `FakeClock`, and the tests assert
on the waits it was asked for, never on how long the machine took.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import socket
import threading
import time
from typing import Any, List, Optional

import pytest

from megalign.align.openai_client import (ChatClient, ClientConfig, CompletionRequest, CompletionResult,
                                          EndpointError, Secret, add_client_arguments, config_from_args)
from megalign.align.rate_limit import Backoff, EndpointPool, RateLimiter, TokenBucket, parse_retry_after
from megalign.errors import ConfigError
from megalign.utils.progress import ProgressMeter

from fault_server import Fault, FaultServer

SECRET = "sk-SECRET-abcdef123456"


class FakeClock:
    """Monotonic time that moves only when something sleeps on it; records every sleep (thread-safe)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


def make_client(urls: Any, clock: Optional[FakeClock] = None, **overrides: Any) -> ChatClient:
    """A client tuned for fast tests: short timeout, tiny backoff, seeded jitter, no key from the env;
    with `clock`, every wait runs on that fake clock."""
    settings = dict(model="fault-model", timeout=0.5, backoff_base=0.01, backoff_max=0.05, max_retries=3,
                    seed=0, api_key_env=None, endpoint_cooldown=0.05)
    settings.update(overrides)
    config = ClientConfig(base_urls=urls if isinstance(urls, list) else [urls], **settings)
    if clock is None:
        return ChatClient(config)
    return ChatClient(config, clock=clock.monotonic, sleep=clock.sleep)


def chat(client: ChatClient, text: str, key: Optional[str] = None, **params: Any) -> CompletionResult:
    return client.chat([{"role": "system", "content": "rewrite"}, {"role": "user", "content": text}],
                       key=key, **params)


def dead_url() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_chat_and_completion_success_and_request_body() -> None:
    with FaultServer() as server:
        client = make_client(server.base_url, temperature=0.5, max_tokens=64, stop=["</s>"],
                             extra_body={"seed": 7})
        result = chat(client, "hello world", key="r1", top_p=0.9)
        assert result.ok and result.text == "ALIGNED: HELLO WORLD" and result.attempts == 1
        assert result.key == "r1" and result.finish_reason == "stop" and result.reason is None
        assert (result.prompt_tokens, result.completion_tokens) == (3, 3)
        body = server.log[0].body
        assert body["model"] == "fault-model" and body["messages"][1] == {"role": "user", "content": "hello world"}
        assert (body["temperature"], body["max_tokens"], body["top_p"], body["stop"], body["seed"]) == (
            0.5, 64, 0.9, ["</s>"], 7)
        assert server.log[0].authorization is None  # no key configured: no header
        plain = client.complete("abc")
        assert plain.ok and plain.text == "ALIGNED: ABC" and server.log[1].path == "/v1/completions"
        assert server.log[1].body["prompt"] == "abc"
        assert client.list_models() == ["fault-model"]
        assert client.check_endpoints() == {server.base_url: None}


@pytest.mark.parametrize("fault,reason", [
    ("500", "http_500"), ("503", "http_503"), ("429", "rate_limited"), ("delay:1.5", "timeout"),
    ("malformed", "malformed_reply"), ("empty_body", "malformed_reply"), ("no_choices", "malformed_reply"),
    ("drop", "connection_error"), ("partial", "connection_error"),
    ("empty", "empty_reply"), ("truncated", "truncated"),
])
def test_each_fault_is_retried_then_succeeds(fault: str, reason: str) -> None:
    with FaultServer({"rec-7": [fault]}) as server:
        client = make_client(server.base_url)
        result = chat(client, "text of rec-7", key="rec-7")
        assert result.ok, result
        assert result.text == "ALIGNED: TEXT OF REC-7"
        assert result.attempts == 2 and server.attempts("rec-7") == 2
        usage = client.usage()
        assert usage["retries"] == 1 and usage["retry_reasons"] == {reason: 1}
        assert usage["failed"] == 0 and usage["succeeded"] == 1


@pytest.mark.parametrize("fault,reason", [
    ("500", "http_500"), ("429", "rate_limited"), ("delay:1.5", "timeout"), ("malformed", "malformed_reply"),
    ("drop", "connection_error"),
])
def test_exhausted_retries_give_a_failure_result(fault: str, reason: str) -> None:
    with FaultServer({"rec-1": [fault] * 10}) as server:
        client = make_client(server.base_url, max_retries=2)
        result = chat(client, "rec-1", key="rec-1")
        assert not result.ok and result.text is None
        assert result.reason == reason and result.attempts == 3 and server.attempts("rec-1") == 3
        assert "3 attempts" in result.message and not result.fatal
        assert client.usage()["failures"] == {reason: 1}
        assert chat(client, "rec-2").ok  # other records are unaffected


@pytest.mark.parametrize("status,fatal", [(400, False), (401, True), (403, True), (404, True)])
def test_client_errors_fail_fast_without_retry(status: int, fatal: bool) -> None:
    with FaultServer({"bad": [str(status)] * 5}) as server:
        client = make_client(server.base_url)
        result = chat(client, "bad record", key="bad")
        assert not result.ok and result.attempts == 1 and server.attempts("bad") == 1
        assert result.reason == f"http_{status}" and result.fatal is fatal
        assert f"HTTP {status}" in result.message and f"injected HTTP {status}" in result.message
        assert server.base_url in result.message


def test_retry_after_is_honoured() -> None:
    clock = FakeClock()
    with FaultServer({"slow": ["429:2"], "fast": ["429"]}) as server:
        client = make_client(server.base_url, clock)
        slow = chat(client, "slow")
        assert slow.ok and slow.attempts == 2
        assert len(clock.sleeps) == 1 and clock.sleeps[0] >= 2.0, clock.sleeps  # Retry-After: 2
        assert slow.elapsed >= 2.0  # measured on the same clock
        fast = chat(client, "fast")
        assert fast.ok and fast.attempts == 2
    assert len(clock.sleeps) == 2
    assert clock.sleeps[1] <= 0.05, clock.sleeps  # without Retry-After only the (tiny) backoff applies


def test_retry_after_is_capped() -> None:
    clock = FakeClock()
    with FaultServer({"r": ["429:30"]}) as server:
        client = make_client(server.base_url, clock, max_retry_after=0.1)
        assert chat(client, "r").ok
    assert clock.sleeps == [pytest.approx(0.1)]  # the server asked for 30 s; the cap is 0.1 s


def test_concurrency_bound_is_respected() -> None:
    with FaultServer(latency=0.05) as server:
        client = make_client(server.base_url, max_concurrency=3, timeout=5)
        results = client.map(CompletionRequest(key=i, prompt=f"doc {i}") for i in range(24))
        assert sorted(r.key for r in results) == list(range(24)) and all(r.ok for r in results)
        assert 2 <= server.max_in_flight <= 3


def test_callback_runs_in_the_calling_thread_and_input_is_consumed_lazily() -> None:
    pulled: List[int] = []

    def requests():
        for i in range(40):
            pulled.append(i)
            yield CompletionRequest(key=i, prompt=f"doc {i}")

    seen = []
    with FaultServer(latency=0.01) as server:
        client = make_client(server.base_url, max_concurrency=2, timeout=5)

        def on_result(result: CompletionResult) -> None:
            seen.append((result.key, threading.get_ident()))
            # the window is 2 x concurrency: never more than that ahead of what was delivered
            assert len(pulled) <= len(seen) + 4

        usage = client.run_many(requests(), on_result)
    assert sorted(k for k, _ in seen) == list(range(40))
    assert {tid for _, tid in seen} == {threading.get_ident()}
    assert usage["requests"] == usage["succeeded"] == 40


def test_keyboard_interrupt_cancels_the_rest() -> None:
    with FaultServer(latency=0.05) as server:
        client = make_client(server.base_url, max_concurrency=2, timeout=5)

        def on_result(result: CompletionResult) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            client.run_many((CompletionRequest(key=i, prompt=f"doc {i}") for i in range(200)), on_result)
        for thread in threading.enumerate():  # let attempts already on the wire finish (bounded)
            if thread.name.startswith("megalign-client"):
                thread.join(timeout=10)
        # at most the 2 x concurrency window was ever started, however fast or slow the machine is
        assert server.total_requests <= 4


def test_fatal_error_stops_the_batch_with_a_clear_error() -> None:
    with FaultServer(api_key="sk-right-key-000") as server:
        client = make_client(server.base_url, api_key=SECRET)
        delivered = []
        with pytest.raises(EndpointError, match="HTTP 401") as info:
            client.run_many((CompletionRequest(key=i, prompt=f"doc {i}") for i in range(50)), delivered.append)
        assert SECRET not in str(info.value)
        assert delivered == [] and server.total_requests < 50


def test_multiple_base_urls_with_one_dead_still_complete_everything() -> None:
    dead = dead_url()
    clock = FakeClock()  # the 5 s cool-down lasts until the fake clock has slept 5 s, however slow the test runs
    with FaultServer() as a, FaultServer() as b:
        client = make_client([dead, a.base_url, b.base_url], clock, max_concurrency=4, endpoint_cooldown=5.0,
                             timeout=5)
        results = client.map(CompletionRequest(key=i, prompt=f"doc {i}") for i in range(30))
        assert len(results) == 30 and all(r.ok for r in results)
        assert a.total_requests > 0 and b.total_requests > 0
        endpoints = client.usage()["endpoints"]
        assert endpoints[dead]["errors"] == endpoints[dead]["attempts"] >= 1
        assert endpoints[dead]["attempts"] <= 4  # avoided while cooling down
        assert client.usage()["retry_reasons"] == {"connection_error": endpoints[dead]["attempts"]}


def test_all_endpoints_dead_fails_with_connection_error() -> None:
    client = make_client([dead_url()], max_retries=1)
    result = client.complete("x", key="k")
    assert not result.ok and result.reason == "connection_error" and result.attempts == 2


@pytest.mark.parametrize("secret", [SECRET, "plainWorkerToken98765"])
def test_api_key_never_appears_in_logs_errors_or_repr(secret: str, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = ClientConfig(base_urls=["http://127.0.0.1:1/v1"], model="m", api_key=secret)
    with FaultServer({"flaky": ["500", "drop"]}, api_key="sk-right-key-000") as server:
        config.base_urls = [server.base_url]
        client = ChatClient(config)
        result = client.complete("flaky", key="flaky")
        print(result, client, config, repr(config), config.to_dict(), json.dumps(config.to_dict()))
        logging.getLogger("test").info("%s %r", config, client)
        out = capsys.readouterr()
    assert server.log[0].authorization == f"Bearer {secret}"  # it was sent...
    assert not result.ok and result.reason == "http_401" and result.attempts == 1
    assert "Incorrect API key provided" in result.message
    for text in (result.message, repr(result), out.out, out.err, caplog.text, repr(config), str(client)):
        assert secret not in text  # ...and never shown
    assert config.to_dict()["api_key_set"] is True and "api_key" not in config.to_dict()
    with pytest.raises(TypeError):
        json.dumps(vars(config))  # the Secret refuses to be serialised by accident


def test_api_key_from_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_EXPERT_KEY", "sk-from-env-999999")
    with FaultServer(api_key="sk-from-env-999999") as server:
        client = make_client(server.base_url, api_key_env="MY_EXPERT_KEY")
        assert client.complete("x").ok
        explicit = make_client(server.base_url, api_key="sk-wrong-1234567", api_key_env="MY_EXPERT_KEY")
        assert explicit.complete("x").reason == "http_401"  # the flag wins over the environment
    assert "sk-from-env" not in repr(client)


def test_usage_totals_are_thread_safe_and_complete() -> None:
    plan = {f"doc {i};": ["500"] for i in range(0, 40, 4)}
    plan.update({"doc 1;": ["500"] * 5})
    with FaultServer(plan) as server:
        client = make_client(server.base_url, max_concurrency=4, max_retries=2, timeout=5)
        results = client.map(CompletionRequest(key=i, prompt=f"doc {i}; x y") for i in range(40))
    usage = client.usage()
    assert usage["requests"] == 40 and usage["succeeded"] == 39 and usage["failed"] == 1
    assert usage["failures"] == {"http_500": 1}
    assert usage["retries"] == 10 + 2 and usage["attempts"] == 40 + 12 == server.total_requests
    assert usage["prompt_tokens"] == sum(r.prompt_tokens for r in results) == 39 * 4
    assert usage["completion_tokens"] == sum(r.completion_tokens for r in results)


def test_validator_rejections_are_retried() -> None:
    def must_mention_ok(text: str) -> Optional[str]:
        return None if "OK" in text else "missing the OK marker"

    with FaultServer({"a1": ["reply:garbage"], "a2": ["reply:junk"] * 3}) as server:
        client = ChatClient(make_client(server.base_url, retry_invalid=1).config, validator=must_mention_ok)
        good = client.complete("a1 ok")
        assert good.ok and good.attempts == 2 and good.text == "ALIGNED: A1 OK"
        bad = client.complete("a2 ok", key="a2")
        assert not bad.ok and bad.reason == "invalid_reply" and bad.attempts == 2
        assert bad.detail == "missing the OK marker" and "missing the OK marker" in bad.message
        per_request = client.execute(CompletionRequest(key="a3", prompt="a3", validator=lambda t: None))
        assert per_request.ok  # the request's own validator overrides the client's
    assert client.usage()["retry_reasons"] == {"invalid_reply": 2}


def test_truncated_reply_exhausts_invalid_budget_unless_accepted() -> None:
    with FaultServer({"t": ["truncated"] * 5}) as server:
        strict = make_client(server.base_url, retry_invalid=2)
        result = strict.complete("t")
        assert result.reason == "truncated" and result.attempts == 3 and result.finish_reason == "length"
        lenient = make_client(server.base_url, accept_truncated=True)
        accepted = lenient.complete("t")
        assert accepted.ok and accepted.finish_reason == "length"


def test_token_bucket_with_fake_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=lambda: now[0])
    assert [bucket.try_acquire(1) for _ in range(4)] == [0.0] * 4
    assert bucket.try_acquire(1) == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.try_acquire(1) == 0.0
    assert bucket.try_acquire(10) == pytest.approx(2.0)  # larger than capacity: waits for a full bucket
    now[0] += 2.0
    assert bucket.try_acquire(10) == 0.0 and bucket.available == pytest.approx(-6.0)  # in debt
    bucket.credit(6.0)
    assert bucket.available == pytest.approx(0.0)


def test_rate_limiter_paces_requests_and_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=6000,  # 10 req/s, 100 tok/s
                          clock=clock.monotonic, sleep=clock.sleep)
    for _ in range(15):
        assert limiter.acquire(1)
    # 10 burst, then 5 more at 0.1 s each
    assert clock.sleeps == [pytest.approx(0.1)] * 5 and clock.now == pytest.approx(0.5)
    tokens = FakeClock()
    by_tokens = RateLimiter(tokens_per_minute=6000, clock=tokens.monotonic, sleep=tokens.sleep)
    assert by_tokens.acquire(100) and tokens.sleeps == []  # a full bucket of 100 tokens
    assert by_tokens.acquire(50) and tokens.sleeps == [pytest.approx(0.5)]  # 50 tokens at 100/s
    cancel = threading.Event()
    cancel.set()
    assert limiter.acquire(10_000, cancel) is False
    assert RateLimiter(requests_per_minute=60).acquire(1, cancel)  # a free slot is taken without waiting


def test_client_rate_limit_spaces_requests() -> None:
    clock = FakeClock()
    with FaultServer() as server:
        client = make_client(server.base_url, clock, requests_per_minute=1200, max_concurrency=4, timeout=5)
        results = client.map(CompletionRequest(key=i, prompt="x") for i in range(30))
        assert len(results) == 30 and all(r.ok for r in results)
    # 20 burst + 10 at 20/s: the clients' waits moved the clock by at least 10 x 0.05 s
    assert clock.now >= 0.5 - 1e-9, clock.sleeps
    assert all(0 < s <= 0.05 + 1e-9 for s in clock.sleeps)


def test_backoff_is_seeded_full_jitter() -> None:
    first = [Backoff(0.5, 4.0, seed=3).delay(k) for k in (1, 2, 3, 4, 5, 6)]
    second = [Backoff(0.5, 4.0, seed=3).delay(k) for k in (1, 2, 3, 4, 5, 6)]
    assert first == second
    assert all(0.0 <= d <= c for d, c in zip(first, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]))


def test_fault_server_default_fault_and_respond_hooks() -> None:
    with FaultServer({"k": ["drop"]}, respond=lambda text: text[::-1],
                     default_fault=lambda info: "503" if info.index % 2 == 0 else None) as server:
        client = make_client(server.base_url, max_retries=4)
        result = client.complete("abc k")
        # index 0: plan for "k" (drop); index 1: default ok
        assert result.ok and result.text == "k cba" and result.attempts == 2
        assert client.complete("xyz").attempts == 2  # index 2 -> 503, index 3 -> ok
        assert server.prompt_counts() == {"abc k": 2, "xyz": 2}
        assert [info.fault.kind for info in server.log] == ["drop", "ok", "http", "ok"]
    assert Fault.parse("429:0.5") == Fault.rate_limit(0.5) and Fault.parse("http_502") == Fault.http(502)
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault.parse("explode")


def test_endpoint_pool_round_robin_least_busy_and_cooldown() -> None:
    pool = EndpointPool(["http://a/v1", "http://b/v1", "http://c/v1"], cooldown=10.0)
    first = [pool.acquire() for _ in range(3)]
    assert [e.url for e in first] == ["http://a/v1", "http://b/v1", "http://c/v1"]
    for e in first[1:]:
        pool.release(e, ok=True)
    assert pool.acquire().url == "http://b/v1"  # a is still busy: least in flight wins
    pool.release(first[0], ok=False, reason="timeout", endpoint_fault=True)
    picks = {pool.acquire().url for _ in range(6)}
    assert "http://a/v1" not in picks  # cooling down while the others can serve
    assert pool.acquire(avoid=pool.endpoints[1]).url != "http://b/v1"


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(future) <= 31


def test_progress_line_has_rates_and_eta() -> None:
    stream = io.StringIO()
    meter = ProgressMeter("annotate", total=5, unit="requests", interval=0.0, stream=stream)
    with FaultServer() as server:
        make_client(server.base_url).run_many((CompletionRequest(key=i, prompt="a b") for i in range(5)),
                                               total=5, progress=meter)
    text = stream.getvalue()
    assert "requests/s" in text and "tokens/s" in text and "ETA" in text and "5/5 requests" in text


def test_config_validation_and_flags() -> None:
    with pytest.raises(ConfigError, match="--base-url"):
        ClientConfig(base_urls=[], model="m")
    with pytest.raises(ConfigError, match="ftp://x"):
        ClientConfig(base_urls=["ftp://x/v1"], model="m")
    with pytest.raises(ConfigError, match="max_concurrency"):
        ClientConfig(base_urls=["http://h/v1"], model="m", max_concurrency=0)
    with pytest.raises(ValueError, match="exactly one"):
        CompletionRequest(key=1)
    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    args = parser.parse_args(["--base-url", "http://a:1/v1/", "http://b:2/v1", "--model", "w",
                              "--concurrency", "16", "--api-key", SECRET, "--tokens-per-minute", "9000"])
    config = config_from_args(args, retry_invalid=2)
    assert config.base_urls == ["http://a:1/v1", "http://b:2/v1"] and config.max_concurrency == 16
    assert config.api_key == Secret(SECRET) and config.tokens_per_minute == 9000 and config.retry_invalid == 2
    assert SECRET not in repr(config)
