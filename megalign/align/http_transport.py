"""Pooled keep-alive HTTP transport for the endpoint client (megalign.align.openai_client).

`HttpTransport` wraps one `httpx.Client`: connections to every base URL are kept alive and reused
across requests and threads, and the usual proxy variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY,
NO_PROXY, and their lower-case forms) are honoured (`trust_env`). It knows nothing of OpenAI: it sends
one request and reads the whole reply within a per-attempt deadline, and turns every way that can fail
(refused or dropped connections, resets, protocol errors, timeouts, oversized or undecodable bodies)
into a `TransportFailure` with one of the client's retry categories as its `reason`:

* ``timeout``: no complete reply within `timeout` seconds of the start (connecting, sending and waiting for
  the headers each get at most `timeout`; a body still arriving at the deadline is cut off there);
* ``connection_error``: the connection could not be made or broke before the reply was complete;
* ``malformed_reply``: the body could not be decoded (bad Content-Encoding).

Policy (retries, backoff, pacing, endpoint choice) stays with the caller.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Mapping, Optional

from megalign.errors import ConfigError

if TYPE_CHECKING:
    import httpx

MAX_REPLY_BYTES = 64 << 20
KEEPALIVE_EXPIRY = 4.0
"""Seconds an idle connection is kept: below the 5 s idle timeout of uvicorn (vLLM) and most servers,
so the client drops a connection before the server does instead of racing it."""


class TransportFailure(Exception):
    """One attempt failed before a complete HTTP reply arrived; `reason` is the retry category."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class HttpReply:
    """A complete HTTP reply: status, headers (case-insensitive) and the decoded body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _Watchdog:
    """Shuts down the connection's socket when the attempt's deadline passes mid-body.

    httpx's read timeout applies to each socket read, so a server that trickles its reply could keep
    an attempt alive for much longer than `timeout`; shutting the socket down wakes the blocked read.
    """

    def __init__(self, response: httpx.Response, seconds: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._done = False
        stream = response.extensions.get("network_stream")
        self._sock: Optional[socket.socket] = stream.get_extra_info("socket") if stream is not None else None
        self._timer: Optional[threading.Timer] = None
        if self._sock is not None:
            self._timer = threading.Timer(max(seconds, 0.0), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done or self._sock is None:
                return
            self.fired = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        """The body is read (or the attempt ended): never touch the socket again."""
        with self._lock:
            self._done = True
        if self._timer is not None:
            self._timer.cancel()


class HttpTransport:
    """Sends requests over pooled keep-alive connections; thread-safe; `close()` ends it.

    timeout: seconds for an attempt (see the module docstring). max_connections: connections open at once over all hosts
    (keep it at least the caller's concurrency). headers: sent with every request. trust_env: read
    proxy settings (and SSL_CERT_FILE / SSL_CERT_DIR) from the environment when constructed.
    """

    def __init__(
        self,
        timeout: float,
        max_connections: int,
        headers: Optional[Mapping[str, str]] = None,
        trust_env: bool = True,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        import httpx  # here, not at the top: it is slow to import, and `megalign ... --help` must stay quick

        self._httpx = httpx
        self.timeout = float(timeout)
        self.max_reply_bytes = max_reply_bytes
        self._closed = False
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )
        try:
            self._client = httpx.Client(
                headers=dict(headers or {}),
                timeout=self.timeout,
                limits=limits,
                trust_env=trust_env,
                follow_redirects=False,
            )
        except (ImportError, ValueError, httpx.InvalidURL) as exc:
            # e.g. ALL_PROXY=socks5://... without socksio, or a proxy URL with an unknown scheme
            raise ConfigError(
                f"cannot use the proxy settings in the environment (HTTP_PROXY, HTTPS_PROXY, "
                f"ALL_PROXY, NO_PROXY): {exc}"
            ) from None

    def __enter__(self) -> "HttpTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection; later requests fail with connection_error. Idempotent."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def request(
        self, method: str, url: str, body: Optional[bytes] = None, headers: Optional[Mapping[str, str]] = None
    ) -> HttpReply:
        """Send one request and read its whole reply within `timeout` s; raises TransportFailure."""
        deadline = time.monotonic() + self.timeout
        httpx = self._httpx
        try:
            return self._exchange(method, url, body, headers, deadline)
        except TransportFailure:
            raise
        except httpx.TimeoutException:
            raise TransportFailure("timeout", f"no complete reply from {url} within {self.timeout:g}s") from None
        except httpx.DecodingError as exc:
            raise TransportFailure("malformed_reply", f"cannot decode the reply from {url}: {exc}") from None
        except (httpx.TransportError, OSError) as exc:
            raise TransportFailure("connection_error", f"connection to {url} failed: {_describe(exc)}") from None
        except RuntimeError:
            if self._closed:  # httpx refuses to send on a closed client
                raise TransportFailure("connection_error", f"request to {url} not sent: the client is closed") from None
            raise

    def _exchange(
        self, method: str, url: str, body: Optional[bytes], headers: Optional[Mapping[str, str]], deadline: float
    ) -> HttpReply:
        request = self._client.build_request(method, url, content=body, headers=headers)
        response = self._client.send(request, stream=True)
        httpx = self._httpx
        watchdog = _Watchdog(response, deadline - time.monotonic())
        try:
            chunks: List[bytes] = []
            size = 0
            try:
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.max_reply_bytes:
                        raise TransportFailure(
                            "connection_error", f"reply from {url} larger than {self.max_reply_bytes} bytes"
                        )
                    if time.monotonic() > deadline:
                        break
            except httpx.TransportError:
                if not watchdog.fired:
                    raise
            if watchdog.fired or time.monotonic() > deadline:
                raise TransportFailure("timeout", f"no complete reply from {url} within {self.timeout:g}s")
            return HttpReply(response.status_code, response.headers, b"".join(chunks))
        finally:
            watchdog.cancel()
            response.close()


def _describe(exc: BaseException) -> str:
    """`Type: message` of a transport error, naming the cause when httpx's own message is empty."""
    text = str(exc)
    if not text and exc.__context__ is not None:
        text = f"{type(exc.__context__).__name__}: {exc.__context__}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
