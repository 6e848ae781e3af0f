"""The client's pooled transport: keep-alive reuse, proxy variables, per-attempt deadlines, close().

Every server here listens on 127.0.0.1 only, every loop is bounded, and every thread ends by itself.
Each test starts with no proxy variable set (tests/align/conftest.py) and sets the ones it means.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, List
from urllib.parse import urlsplit

import pytest

from megalign.align.http_transport import HttpTransport, TransportFailure
from megalign.align.openai_client import ChatClient, ClientConfig, CompletionRequest
from megalign.errors import ConfigError

from fault_server import FaultServer

def make_client(url: str, **overrides: Any) -> ChatClient:
    settings = dict(model="fault-model", timeout=5.0, backoff_base=0.01, backoff_max=0.05, max_retries=3, seed=0,
                    api_key_env=None, endpoint_cooldown=0.05)
    settings.update(overrides)
    return ChatClient(ClientConfig(base_urls=[url], **settings))


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll `condition` every 10 ms for at most `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# ---------------------------------------------------------------- keep-alive


def test_sequential_requests_reuse_one_connection() -> None:
    with FaultServer(keep_alive=True) as server:
        with make_client(server.base_url) as client:
            for i in range(10):
                assert client.complete(f"doc {i}").ok
            assert client.list_models() == ["fault-model"]
        assert server.total_requests == 10
        assert server.connections == 1  # all eleven requests on one kept-alive connection


def test_concurrent_requests_open_at_most_one_connection_per_slot() -> None:
    with FaultServer(keep_alive=True, latency=0.01) as server:
        with make_client(server.base_url, max_concurrency=4) as client:
            results = client.map(CompletionRequest(key=i, prompt=f"doc {i}") for i in range(40))
        assert len(results) == 40 and all(r.ok for r in results)
        assert 1 <= server.connections <= 4


@pytest.mark.parametrize("fault,reason,connections", [
    ("500", "http_500", 1), ("malformed", "malformed_reply", 1),
    ("drop", "connection_error", 2), ("partial", "connection_error", 2), ("delay:1.5", "timeout", 2),
])
def test_faults_on_kept_alive_connections_map_to_the_same_retry_reasons(
        fault: str, reason: str, connections: int) -> None:
    with FaultServer({"rec": [fault]}, keep_alive=True) as server:
        with make_client(server.base_url, timeout=0.5) as client:
            assert client.complete("warm up").attempts == 1
            result = client.complete("rec")
            assert result.ok and result.attempts == 2
            assert client.complete("after").attempts == 1
            assert client.usage()["retry_reasons"] == {reason: 1}
        # a reply that left the connection usable keeps it; a broken or abandoned one is replaced once
        assert server.connections == connections


def test_connection_closed_by_the_server_while_idle_is_not_a_failure() -> None:
    with FaultServer({"first": ["hangup"]}, keep_alive=True) as server:
        with make_client(server.base_url) as client:
            assert client.complete("first").ok
            assert wait_until(lambda: server.closed_connections == 1)  # the server hung up the idle connection
            second = client.complete("second")
            assert second.ok and second.attempts == 1 and client.usage()["retries"] == 0
        assert server.connections == 2


def test_close_closes_pooled_connections_and_stops_new_requests() -> None:
    with FaultServer(keep_alive=True) as server:
        client = make_client(server.base_url)
        assert client.complete("x").ok
        client.close()
        assert wait_until(lambda: server.closed_connections == 1)
        after = client.complete("y")
        assert not after.ok and after.reason == "cancelled" and server.total_requests == 1
        client.close()  # idempotent


def test_transport_reports_a_closed_client_as_connection_error() -> None:
    transport = HttpTransport(timeout=1.0, max_connections=1)
    transport.close()
    with pytest.raises(TransportFailure) as info:
        transport.request("GET", "http://127.0.0.1:9/v1/models")
    assert info.value.reason == "connection_error" and "closed" in info.value.message


# ---------------------------------------------------------------- per-attempt deadline


def test_a_trickled_reply_is_cut_off_at_the_attempt_deadline() -> None:
    """Each byte arrives well within the read timeout, but the whole reply would take 4 s; timeout is 0.5 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    outcome: List[str] = []

    def trickle() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n")
            try:
                for _ in range(40):
                    conn.sendall(b" ")
                    time.sleep(0.1)
                outcome.append("sent everything")
            except OSError:
                outcome.append("client hung up")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        transport = HttpTransport(timeout=0.5, max_connections=1)
        with pytest.raises(TransportFailure) as info:
            transport.request("GET", f"http://127.0.0.1:{listener.getsockname()[1]}/slow")
        transport.close()
        thread.join(timeout=10)
    finally:
        listener.close()
    assert info.value.reason == "timeout" and "0.5s" in info.value.message
    assert outcome == ["client hung up"]


def test_oversized_reply_is_a_connection_error() -> None:
    with FaultServer(respond=lambda text: "x" * 5000) as server:
        transport = HttpTransport(timeout=5.0, max_connections=1, max_reply_bytes=1000)
        with pytest.raises(TransportFailure, match="larger than 1000 bytes") as info:
            transport.request("POST", server.base_url + "/completions", b'{"prompt": "a"}')
        transport.close()
    assert info.value.reason == "connection_error"


# ---------------------------------------------------------------- proxy variables


class RecordingProxy:
    """A forward HTTP proxy on 127.0.0.1 that records each request's target and relays it (loopback only)."""

    def __init__(self) -> None:
        self.targets: List[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                target = urlsplit(self.path)
                proxy.targets.append(self.path)
                if target.hostname != "127.0.0.1" or target.port is None:
                    self.send_error(502, "this test proxy forwards to 127.0.0.1 only")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",
                                                                                            "proxy-connection")}
                    upstream.request(self.command, target.path or "/", body=body or None, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                    self.send_response(reply.status)
                    for name, value in reply.getheaders():
                        if name.lower() not in ("connection", "content-length", "transfer-encoding"):
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_POST = _relay

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.mark.parametrize("variable,via_proxy", [
    ("HTTP_PROXY", True), ("http_proxy", True), ("ALL_PROXY", True), ("HTTPS_PROXY", False),
])
def test_proxy_variables_route_requests_through_the_proxy(variable: str, via_proxy: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultServer() as server, RecordingProxy() as proxy:
        monkeypatch.setenv(variable, proxy.url)
        with make_client(server.base_url) as client:
            result = client.complete("through the proxy")
        assert result.ok and result.text == "ALIGNED: THROUGH THE PROXY"
        assert server.total_requests == 1
        # HTTPS_PROXY is for https:// URLs only; these are http://
        assert proxy.targets == ([f"{server.base_url}/completions"] if via_proxy else [])


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_covering_the_host_bypasses_the_proxy(no_proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultServer() as server, RecordingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        with make_client(server.base_url) as client:
            assert client.complete("direct").ok
            assert client.list_models() == ["fault-model"]
        assert proxy.targets == [] and server.total_requests == 1


def test_an_unusable_proxy_setting_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "ftp://127.0.0.1:9")
    with pytest.raises(ConfigError, match="HTTP_PROXY"):
        make_client("http://127.0.0.1:9/v1")
