"""An OpenAI-compatible HTTP server over a megalign model: /v1/models, /v1/completions, /v1/chat/completions.

The request and reply bodies follow OpenAI's API, so OpenAI clients, the rewrite stage's client and
evaluation harnesses talk to it as to vLLM. Supported request fields: ``model`` (must name this server's
model when given), ``prompt`` (a string or a list of strings) or ``messages``, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``stop`` (a string or a list), ``seed``, ``n`` (1 only) and
``stream``. Replies carry ``usage`` token counts. With ``"stream": true`` the reply is server-sent events
in OpenAI's chunk format; since generation is batched, each choice's text arrives as one chunk, followed
by a chunk with its ``finish_reason`` and ``data: [DONE]``. Errors use OpenAI's ``{"error": {...}}`` body
with status 400 (bad request, prompt too long), 401 (wrong API key), 404 (unknown path or model) or 500.

Defaults follow OpenAI: ``max_tokens`` 16 for completions and the rest of the context for chat,
``temperature`` 1.0, ``top_p`` 1.0. The server binds 127.0.0.1 unless told otherwise, and with an
``api_key`` requires ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from megalign.errors import ConfigError
from megalign.inference.batching import ChatTemplateError
from megalign.inference.generation import Completion, GenerationParams, PromptTooLongError

__all__ = ["ApiError", "ModelServer", "parse_generation_params"]

_MAX_BODY = 64 * 1024 * 1024


class ApiError(Exception):
    """An error reply: HTTP ``status`` and OpenAI's error ``type``/``param``/``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: Dict[str, Any], name: str, default: Any, kind: type = float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ApiError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}, got {value!r}", param=name)
    return kind(value)


def parse_generation_params(body: Dict[str, Any], default_max_tokens: Optional[int]) -> GenerationParams:
    """GenerationParams of an OpenAI request body (ApiError 400 naming the field for a bad value)."""
    stop = body.get("stop")
    stops: Tuple[str, ...] = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if _number(body, "n", 1, int) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = _number(body, "max_tokens", body.get("max_completion_tokens", default_max_tokens), int)
    try:
        return GenerationParams(
            max_new_tokens=max_tokens if max_tokens is not None else None,
            max_new_tokens_ratio=None if max_tokens is not None else 1e9,
            ratio_slack=0,
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_number(body, "top_k", 0, int),
            seed=_number(body, "seed", None, int),
            stop=stops,
        )
    except ConfigError as exc:
        raise ApiError(400, str(exc).replace("generation: ", "")) from None


class CompletionEngine(Protocol):
    """What the server generates with: a BatchingEngine, or a stand-in such as the rule-based expert."""

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> List[Completion]: ...

    def chat(self, conversations: Sequence[List[Dict[str, str]]], params: GenerationParams) -> List[Completion]: ...

    def close(self) -> None: ...


class ModelServer:
    """Serves ``engine`` as ``model_name`` on ``host:port`` (port 0: any free port).

    ``engine``: a BatchingEngine, or anything with ``generate(prompts, params)`` and ``chat(conversations,
    params)`` returning Completions (e.g. megalign.align.rule_based_expert.RuleBasedExpert).
    """

    def __init__(
        self,
        engine: CompletionEngine,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: Optional[str] = None,
    ) -> None:
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.created = int(time.time())
        server = self

        class Handler(_Handler):
            owner = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        assert isinstance(host, str)  # server_bind() stores socket.getsockname(), whose host is a str
        return f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> "ModelServer":
        """Serve on a background thread (for tests and in-process use)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="megalign-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- the API -------------------------------------------------------------------------------------
    def models(self) -> Dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "megalign"}],
        }

    def _check_model(self, body: Dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _run(self, prompts: List[str], params: GenerationParams) -> List[Completion]:
        try:
            return self.engine.generate(prompts, params)
        except PromptTooLongError as exc:
            raise ApiError(
                400, str(exc), param="prompt" if len(prompts) > 1 else None, code="context_length_exceeded"
            ) from None

    @staticmethod
    def _usage(results: List[Completion]) -> Dict[str, int]:
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completions(self, body: Dict[str, Any]) -> Dict[str, Any]:
        self._check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        results = self._run(prompts, parse_generation_params(body, 16))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "usage": self._usage(results),
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
        }

    def chat_completions(self, body: Dict[str, Any]) -> Dict[str, Any]:
        self._check_model(body)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise ApiError(
                400,
                "'messages' must be a non-empty list of {role, content} objects with string content",
                param="messages",
            )
        params = parse_generation_params(body, None)
        try:
            results = self.engine.chat([[{"role": m["role"], "content": m["content"]} for m in messages]], params)
        except PromptTooLongError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "usage": self._usage(results),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": results[0].text},
                    "finish_reason": results[0].finish_reason,
                    "logprobs": None,
                }
            ],
        }


def _stream_chunks(reply: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The SSE chunks of a finished reply: each choice's text in one chunk, then its finish_reason."""
    chat = reply["object"] == "chat.completion"
    kind = "chat.completion.chunk" if chat else "text_completion"
    chunks = []
    for choice in reply["choices"]:
        text = choice["message"]["content"] if chat else choice["text"]
        for payload, reason in ((text, None), ("", choice["finish_reason"])):
            part = (
                {"delta": {"role": "assistant", "content": payload} if reason is None else {}}
                if chat
                else {"text": payload}
            )
            chunks.append(
                {
                    "id": reply["id"],
                    "object": kind,
                    "created": reply["created"],
                    "model": reply["model"],
                    "choices": [{"index": choice["index"], **part, "finish_reason": reason}],
                }
            )
    chunks[-1]["usage"] = reply["usage"]
    return chunks


class _Handler(BaseHTTPRequestHandler):
    owner: ModelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep request logs quiet
        pass

    def _send(self, status: int, body: Dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, reply: Dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in _stream_chunks(reply):
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def _authorised(self) -> bool:
        key = self.owner.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    def _handle(self, method: str) -> None:
        try:
            if not self._authorised():
                raise ApiError(
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer KEY')",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
            path = self.path.split("?", 1)[0].rstrip("/")
            routes = {
                ("GET", "/v1/models"): None,
                ("POST", "/v1/completions"): self.owner.completions,
                ("POST", "/v1/chat/completions"): self.owner.chat_completions,
            }
            if (method, path) not in routes:
                raise ApiError(
                    404,
                    f"no route {method} {path}; this server has GET /v1/models, POST "
                    "/v1/completions and POST /v1/chat/completions",
                    code="not_found",
                )
            route = routes[(method, path)]
            if route is None:  # GET /v1/models
                self._send(200, self.owner.models())
                return
            body = self._read_json()
            reply = route(body)
            if body.get("stream"):
                self._send_stream(reply)
            else:
                self._send(200, reply)
        except ApiError as error:
            self._send(error.status, error.body())
        except Exception as exc:  # a bug or a generation failure: the client gets a 500, the server stays up
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body(),
            )

    def _read_json(self) -> Dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > _MAX_BODY:
            raise ApiError(400, f"the request needs a JSON body of at most {_MAX_BODY} bytes (Content-Length)")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")
