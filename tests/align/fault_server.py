"""A loopback OpenAI-compatible server that injects faults on a deterministic plan (for tests).

Serves ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` on 127.0.0.1 (a free
port). Each request's *prompt text* is the contents of all its messages joined by newlines (chat) or its
prompt (completions). The plan maps a substring of the prompt text (e.g. a record id) to the faults its
successive attempts get; attempts beyond the list, and prompts no key matches, get ``default_fault(info)``
(default: none) and then a normal reply ``respond(last_text)``, where ``last_text`` is the last user
message (chat) or the prompt (completions). The default reply is ``"ALIGNED: " + last_text.upper()``.

    plan = {"rec-1": ["500", "429:0.2", "ok"], "rec-2": [Fault.drop()] * 3}
    with FaultServer(plan, latency=0.01) as server:
        client = ChatClient(ClientConfig(base_urls=[server.base_url], model=server.model))
        ...
        assert server.attempts("rec-1") == 3 and server.max_in_flight <= 4

Import it as ``from fault_server import FaultServer, Fault`` in tests/align/ (pytest puts a test file's
folder on sys.path; the folders under tests/ are not packages, so test file names are unique).

Fault specs (a `Fault` or its string form):
  "ok"             normal reply
  "500", "503"...  that HTTP status with an OpenAI-style error body ("400", "401", "404" too)
  "429", "429:0.3" rate limited, optionally with ``Retry-After: 0.3``
  "delay:0.5"      wait 0.5 s, then reply normally (longer than the client timeout -> a timeout)
  "malformed"      200 with a body that is not JSON
  "empty_body"     200 with an empty body
  "no_choices"     200 with ``"choices": []``
  "empty"          200 with an empty message content
  "truncated"      200 with half the reply and ``finish_reason: "length"``
  "drop"           close the connection without replying
  "hangup"         reply normally, then close the connection without saying so (a keep-alive server that
                   times an idle connection out; the client must not reuse it)
  "partial"        send headers and half the body, then close
  "reply:TEXT"     200 with TEXT as the reply
``default_fault`` sees a `RequestInfo` (``index``: the request's number on this server, ``prompt``,
``body``), so e.g. ``default_fault=lambda info: "500" if info.index % 3 == 0 else None`` fails every third
request. ``latency`` delays every reply (for concurrency tests; ``max_in_flight`` records the peak).
With ``api_key`` set, requests without ``Authorization: Bearer <api_key>`` get a 401 whose message
echoes the key presented (as OpenAI's does), so tests can check that clients redact it.
``keep_alive=True`` answers in HTTP/1.1 and keeps connections open between requests (the default closes
each one after its reply, as HTTP/1.0 does); an idle connection is closed after ``idle_timeout`` seconds.
``connections`` counts the connections accepted and ``closed_connections`` those that ended, so tests can
check that clients reuse them and close them.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

FAULT_KINDS = ("ok", "http", "rate_limit", "delay", "malformed", "empty_body", "no_choices", "empty",
               "truncated", "drop", "hangup", "partial", "reply")


@dataclass(frozen=True)
class Fault:
    """One injected behaviour; see the module docstring for the kinds."""

    kind: str = "ok"
    status: int = 200
    retry_after: Optional[float] = None
    seconds: float = 0.0
    text: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")

    @classmethod
    def http(cls, status: int) -> "Fault":
        return cls("rate_limit", 429) if status == 429 else cls("http", status)

    @classmethod
    def rate_limit(cls, retry_after: Optional[float] = None) -> "Fault":
        return cls("rate_limit", 429, retry_after=retry_after)

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        return cls("delay", seconds=seconds)

    @classmethod
    def drop(cls) -> "Fault":
        return cls("drop")

    @classmethod
    def reply(cls, text: str) -> "Fault":
        return cls("reply", text=text)

    @classmethod
    def parse(cls, spec: Union[str, "Fault", None]) -> "Fault":
        """A Fault from its string form ("500", "429:0.3", "delay:0.5", "drop", "reply:TEXT", ...)."""
        if spec is None:
            return cls()
        if isinstance(spec, Fault):
            return spec
        name, _, arg = str(spec).partition(":")
        if name.startswith("http_"):
            name = name[5:]
        if name.isdigit():
            status = int(name)
            if status == 429:
                return cls.rate_limit(float(arg) if arg else None)
            return cls.http(status)
        if name == "delay":
            return cls.delay(float(arg))
        if name == "reply":
            return cls.reply(arg)
        if name == "rate_limit":
            return cls.rate_limit(float(arg) if arg else None)
        return cls(name)


FaultSpec = Union[str, Fault, None]


@dataclass
class RequestInfo:
    """What the server saw for one request (in `FaultServer.log`)."""

    index: int
    path: str
    prompt: str
    body: Dict[str, Any]
    authorization: Optional[str]
    plan_key: Optional[str] = None
    attempt: int = 0
    fault: Fault = field(default_factory=Fault)


def default_respond(last_text: str) -> str:
    """The default deterministic reply: the last user message, upper-cased, with a prefix."""
    return "ALIGNED: " + last_text.upper()


def _prompt_text(body: Mapping[str, Any]) -> tuple:
    """(all prompt text, last user text) of a chat or completions request body."""
    if "messages" in body:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        contents = [str(m.get("content", "")) for m in messages]
        users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
        return "\n".join(contents), (users[-1] if users else (contents[-1] if contents else ""))
    prompt = body.get("prompt", "")
    prompt = "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
    return prompt, prompt


class FaultServer:
    """The server; use as a context manager (starts on enter, stops on exit)."""

    def __init__(self, plan: Optional[Mapping[str, Sequence[FaultSpec]]] = None, *,
                 respond: Callable[[str], str] = default_respond,
                 default_fault: Optional[Callable[[RequestInfo], FaultSpec]] = None,
                 latency: float = 0.0, api_key: Optional[str] = None, model: str = "fault-model",
                 keep_alive: bool = False, idle_timeout: float = 5.0) -> None:
        self.plan: Dict[str, List[Fault]] = {k: [Fault.parse(f) for f in v] for k, v in (plan or {}).items()}
        self.respond = respond
        self.default_fault = default_fault
        self.latency = latency
        self.api_key = api_key
        self.model = model
        self.keep_alive = keep_alive
        self.idle_timeout = idle_timeout
        self.connections = 0
        self.closed_connections = 0
        self.log: List[RequestInfo] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._plan_counts: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "FaultServer":
        handler = type("FaultHandler", (_Handler,), {
            "fault_server": self, "protocol_version": "HTTP/1.1" if self.keep_alive else "HTTP/1.0",
            "timeout": self.idle_timeout if self.keep_alive else None})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start the server first"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """e.g. http://127.0.0.1:PORT/v1"""
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------ inspection

    def attempts(self, substring: str) -> int:
        """How many requests had `substring` in their prompt text."""
        with self._lock:
            return sum(substring in info.prompt for info in self.log)

    def prompt_counts(self) -> Dict[str, int]:
        """Requests received per distinct prompt text."""
        with self._lock:
            counts: Dict[str, int] = {}
            for info in self.log:
                if info.path != "/v1/models":
                    counts[info.prompt] = counts.get(info.prompt, 0) + 1
            return counts

    @property
    def total_requests(self) -> int:
        """Completion requests received (not counting /models)."""
        with self._lock:
            return sum(info.path != "/v1/models" for info in self.log)

    def add_faults(self, key: str, faults: Sequence[FaultSpec]) -> None:
        """Append faults to the plan for `key` (while the server runs)."""
        with self._lock:
            self.plan.setdefault(key, []).extend(Fault.parse(f) for f in faults)

    # ------------------------------------------------------------ request handling (server threads)

    def _register(self, path: str, body: Dict[str, Any], authorization: Optional[str]) -> RequestInfo:
        prompt, _ = _prompt_text(body)
        with self._lock:
            info = RequestInfo(len(self.log), path, prompt, body, authorization)
            for key, faults in self.plan.items():
                if key in prompt:
                    info.plan_key = key
                    info.attempt = self._plan_counts.get(key, 0)
                    self._plan_counts[key] = info.attempt + 1
                    if info.attempt < len(faults):
                        info.fault = faults[info.attempt]
                    break
            self.log.append(info)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if info.fault.kind == "ok" and self.default_fault is not None and (
                info.plan_key is None or info.attempt >= len(self.plan[info.plan_key])):
            info.fault = Fault.parse(self.default_fault(info))
        return info

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _disconnected(self) -> None:
        with self._lock:
            self.closed_connections += 1

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _completion(self, info: RequestInfo, chat: bool, text: str, finish_reason: str = "stop") -> Dict[str, Any]:
        prompt_tokens = len(info.prompt.split())
        choice: Dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": f"cmpl-{info.index}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                          "total_tokens": prompt_tokens + len(text.split())}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def _error_body(status: int, message: str) -> Dict[str, Any]:
    return {"error": {"message": message, "type": "injected_fault", "code": status}}


class _Handler(BaseHTTPRequestHandler):
    fault_server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
        pass

    def setup(self) -> None:  # once per accepted connection
        super().setup()
        self.fault_server._connected()

    def finish(self) -> None:  # once per connection, when it ends
        try:
            super().finish()
        finally:
            self.fault_server._disconnected()

    def _send(self, status: int, payload: Union[bytes, Dict[str, Any]], headers: Optional[Dict[str, str]] = None
              ) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.fault_server.model, "object": "model"}]})
        else:
            self._send(404, _error_body(404, f"no route {self.path}"))

    def do_POST(self) -> None:
        server = self.fault_server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._send(404, _error_body(404, f"no route {self.path}"))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, _error_body(400, "request body is not JSON"))
            return
        info = server._register(self.path, body, self.headers.get("Authorization"))
        try:
            if server.latency:
                server._stop.wait(server.latency)
            self._serve(info, chat=self.path.endswith("/chat/completions"))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. timed out) first
        finally:
            server._done()

    def _serve(self, info: RequestInfo, chat: bool) -> None:
        server, fault = self.fault_server, info.fault
        if server.api_key is not None and info.authorization != f"Bearer {server.api_key}":
            presented = (info.authorization or "").replace("Bearer ", "")
            self._send(401, _error_body(401, f"Incorrect API key provided: {presented}"))
            return
        _, last_text = _prompt_text(info.body)
        text = fault.text if fault.kind == "reply" else server.respond(last_text)
        kind = fault.kind
        if kind == "delay":
            if server._stop.wait(fault.seconds):
                return
            kind = "ok"
        if kind in ("ok", "reply", "hangup"):
            self._send(200, server._completion(info, chat, text))
            if kind == "hangup":
                self.close_connection = True
        elif kind == "http":
            self._send(fault.status, _error_body(fault.status, f"injected HTTP {fault.status}"))
        elif kind == "rate_limit":
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            self._send(429, _error_body(429, "Rate limit reached (injected)"), headers)
        elif kind == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "unterminated')
        elif kind == "empty_body":
            self._send(200, b"")
        elif kind == "no_choices":
            self._send(200, {"id": f"cmpl-{info.index}", "choices": []})
        elif kind == "empty":
            self._send(200, server._completion(info, chat, ""))
        elif kind == "truncated":
            self._send(200, server._completion(info, chat, text[: max(1, len(text) // 2)], "length"))
        elif kind == "drop":
            self.close_connection = True
        elif kind == "partial":
            data = json.dumps(server._completion(info, chat, text)).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
