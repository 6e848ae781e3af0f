"""Client-side pacing for remote LLM endpoints: token buckets, backoff, Retry-After, endpoint choice.

`RateLimiter` combines a requests-per-minute and a tokens-per-minute bucket (the two limits OpenAI
and most gateways enforce). Each bucket holds up to `burst_seconds` worth of its rate, so after an idle
period at most that much is sent at once; afterwards requests are spaced at the configured rate.
Token costs are estimated before a request (prompt size + max_tokens, as OpenAI counts them) and
settled against the server's reported usage afterwards. `EndpointPool` spreads attempts over several
base URLs and keeps failing ones on a cool-down so that the healthy ones carry the load.

Time is injectable everywhere: `clock` (a monotonic time function, default time.monotonic) and `sleep`
(a function of seconds; default None: really wait, waking at once when a cancel event is set). Tests
pass a fake pair and assert on the waits asked for, so nothing depends on the machine's speed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Callable, List, Optional, Sequence
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""A monotonic time function (seconds)."""
Sleep = Callable[[float], None]
"""A function that waits the given seconds."""


def wait_or_cancel(seconds: float, cancel: Optional[threading.Event] = None, sleep: Optional[Sleep] = None) -> bool:
    """Wait `seconds`; True if `cancel` is set (at once, or when the wait ends).

    sleep None waits on the real clock and wakes as soon as `cancel` is set; an injected `sleep` is
    called for the whole wait and `cancel` is checked when it returns.
    """
    if sleep is None:
        if cancel is None:
            time.sleep(max(seconds, 0.0))
            return False
        return cancel.wait(max(seconds, 0.0))
    if cancel is not None and cancel.is_set():
        return True
    sleep(max(seconds, 0.0))
    return cancel is not None and cancel.is_set()


_TOKEN_EPSILON = 1e-9
"""Token shortfall treated as none: a wait of ~1e-18 s would not move a clock (real or fake) at all."""


class TokenBucket:
    """A thread-safe token bucket refilled continuously at `rate` tokens per second.

    `acquire(n)` waits until the bucket holds min(n, capacity) tokens and then takes n, so a single
    request larger than the capacity is admitted from a full bucket and leaves the bucket in debt
    (later requests wait for the debt to be repaid). `clock` and `sleep` are injectable (module docstring).
    """

    def __init__(
        self,
        rate: float,
        capacity: Optional[float] = None,
        clock: Clock = time.monotonic,
        sleep: Optional[Sleep] = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"token bucket rate must be positive, got {rate}")
        self.rate = float(rate)
        self.capacity = float(capacity) if capacity is not None else max(1.0, self.rate)
        if self.capacity <= 0:
            raise ValueError(f"token bucket capacity must be positive, got {capacity}")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def available(self) -> float:
        """Tokens in the bucket now (negative while in debt)."""
        with self._lock:
            self._refill()
            return self._tokens

    def try_acquire(self, amount: float) -> float:
        """Take `amount` tokens if possible and return 0.0; otherwise take nothing and return the
        seconds to wait before the bucket could admit it."""
        with self._lock:
            self._refill()
            needed = min(float(amount), self.capacity)
            if self._tokens >= needed - _TOKEN_EPSILON:  # rounding must not leave a wait too short to count
                self._tokens -= amount
                return 0.0
            return (needed - self._tokens) / self.rate

    def acquire(self, amount: float, cancel: Optional[threading.Event] = None) -> bool:
        """Block until `amount` tokens are taken. Returns False (taking nothing) if `cancel` is set."""
        while True:
            wait = self.try_acquire(amount)
            if wait <= 0.0:
                return True
            if wait_or_cancel(wait, cancel, self._sleep):
                return False

    def credit(self, amount: float) -> None:
        """Return tokens (negative: charge more), e.g. after the server reports the real cost."""
        with self._lock:
            self._refill()
            self._tokens = min(self.capacity, self._tokens + amount)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits; either may be None (unlimited)."""

    def __init__(
        self,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        burst_seconds: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Optional[Sleep] = None,
    ) -> None:
        self.requests = (
            TokenBucket(requests_per_minute / 60.0, max(1.0, requests_per_minute / 60.0 * burst_seconds), clock, sleep)
            if requests_per_minute
            else None
        )
        self.tokens = (
            TokenBucket(tokens_per_minute / 60.0, max(1.0, tokens_per_minute / 60.0 * burst_seconds), clock, sleep)
            if tokens_per_minute
            else None
        )

    def acquire(self, estimated_tokens: int, cancel: Optional[threading.Event] = None) -> bool:
        """Wait for one request slot and `estimated_tokens` tokens; False if cancelled while waiting."""
        if self.requests is not None and not self.requests.acquire(1, cancel):
            return False
        if self.tokens is not None and not self.tokens.acquire(estimated_tokens, cancel):
            if self.requests is not None:
                self.requests.credit(1)
            return False
        return True

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket once the server has reported what a request really cost."""
        if self.tokens is not None and actual_tokens > 0:
            self.tokens.credit(estimated_tokens - actual_tokens)


class Backoff:
    """Full-jitter exponential backoff: attempt k (1-based) sleeps uniform(0, min(cap, base * 2**(k-1))).

    Seedable (`seed`) so tests and reruns see the same delays; thread-safe. It only computes delays:
    the caller waits (with its own injectable `sleep`).
    """

    def __init__(self, base: float, cap: float, seed: Optional[int] = None) -> None:
        if base < 0 or cap < 0:
            raise ValueError(f"backoff base and cap must be >= 0, got {base}, {cap}")
        self.base = base
        self.cap = cap
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number `retry` (1 for the first retry)."""
        ceiling = min(self.cap, self.base * (2.0 ** min(max(retry - 1, 0), 30)))
        with self._lock:
            return self._random.uniform(0.0, ceiling)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unparseable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Endpoint:
    """One base URL (scheme, host, port and path split out) with its load and health."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/")
        self.in_flight = 0
        self.consecutive_failures = 0
        self.cooldown_until = 0.0


class EndpointPool:
    """Picks an endpoint per attempt: not cooling down first, then least in flight, then round-robin.

    An endpoint that fails (connection, timeout, 5xx) is avoided for `cooldown` seconds, doubling per
    consecutive failure up to 60 s, or for the server's Retry-After; when every endpoint is cooling
    down the one that recovers first is used, so requests never stall on the pool. `clock` is injectable.
    """

    def __init__(self, urls: Sequence[str], cooldown: float, clock: Clock = time.monotonic) -> None:
        self.endpoints: List[Endpoint] = [Endpoint(u) for u in urls]
        self.cooldown = cooldown
        self._clock = clock
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self, avoid: Optional[Endpoint] = None) -> Endpoint:
        """The endpoint for the next attempt (`avoid`: the one that just failed this request)."""
        with self._lock:
            now = self._clock()
            n = len(self.endpoints)
            order = [self.endpoints[(self._next + i) % n] for i in range(n)]
            best = min(order, key=lambda e: (e is avoid, max(e.cooldown_until - now, 0.0), e.in_flight))
            self._next = (self.endpoints.index(best) + 1) % n
            best.in_flight += 1
            return best

    def release(
        self,
        endpoint: Endpoint,
        ok: bool,
        reason: str = "",
        endpoint_fault: bool = False,
        retry_after: Optional[float] = None,
    ) -> None:
        """Record how the attempt on `endpoint` ended."""
        with self._lock:
            endpoint.in_flight -= 1
            if ok:
                endpoint.consecutive_failures = 0
            if ok or not (endpoint_fault or retry_after):
                return
            endpoint.consecutive_failures += 1
            pause = retry_after or min(60.0, self.cooldown * 2.0 ** min(endpoint.consecutive_failures - 1, 10))
            now = self._clock()
            was_healthy = endpoint.cooldown_until <= now
            endpoint.cooldown_until = max(endpoint.cooldown_until, now + pause)
        if was_healthy and len(self.endpoints) > 1:
            logger.info("endpoint %s failing (%s); preferring the others for %.1fs", endpoint.url, reason, pause)
