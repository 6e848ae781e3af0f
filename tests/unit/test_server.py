"""`megalign serve`: the OpenAI-compatible API over a real checkpoint, on loopback, with the openai-style
request/reply bodies, batching of concurrent requests, streaming, errors and the API key."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from megalign.inference.batching import BatchingEngine
from megalign.inference.generation import GenerationParams
from megalign.inference.model_loading import load_model
from megalign.inference.server import ModelServer


@pytest.fixture(scope="module")
def loaded(tiny_llama_checkpoint):
    return load_model(tiny_llama_checkpoint)


@pytest.fixture()
def server(loaded):
    engine = BatchingEngine(loaded.generator(max_batch_size=8), max_batch_size=8, max_wait_seconds=0.05)
    with ModelServer(engine, "tiny-worker", port=0) as running:
        yield running
    engine.close()


def _call(url, body=None, key=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            raw = reply.read().decode()
            return reply.status, (json.loads(raw) if reply.headers["Content-Type"] == "application/json" else raw)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_completions_match_in_process_generation(server, loaded):
    status, models = _call(server.base_url + "/models")
    assert status == 200 and models["data"][0]["id"] == "tiny-worker"
    prompts = ["مرحبا بكم في", "The city of"]
    status, reply = _call(server.base_url + "/completions",
                          {"model": "tiny-worker", "prompt": prompts, "max_tokens": 12, "temperature": 0})
    assert status == 200 and reply["object"] == "text_completion"
    expected = loaded.generator().generate(prompts, GenerationParams(max_new_tokens=12))
    assert [c["text"] for c in reply["choices"]] == [e.text for e in expected]
    assert [c["finish_reason"] for c in reply["choices"]] == [e.finish_reason for e in expected]
    assert reply["usage"]["completion_tokens"] == sum(e.completion_tokens for e in expected)
    assert reply["usage"]["prompt_tokens"] == sum(e.prompt_tokens for e in expected)


def test_chat_completions_use_the_chat_template(server, loaded):
    messages = [{"role": "system", "content": "أعد صياغة النص."}, {"role": "user", "content": "نص قصير"}]
    status, reply = _call(server.base_url + "/chat/completions",
                          {"messages": messages, "max_tokens": 10, "temperature": 0})
    assert status == 200 and reply["object"] == "chat.completion"
    prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = loaded.generator().generate([prompt], GenerationParams(max_new_tokens=10))[0]
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert reply["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_concurrent_requests_are_batched_and_answered_alike(server, loaded):
    prompts = [f"document number {i} says" for i in range(8)]
    body = lambda p: {"prompt": p, "max_tokens": 6, "temperature": 0}  # noqa: E731
    alone = [_call(server.base_url + "/completions", body(p))[1]["choices"][0]["text"] for p in prompts[:2]]
    before = server.engine.batches
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _call(server.base_url + "/completions", body(p)), prompts))
    assert all(status == 200 for status, _ in replies)
    assert server.engine.batches - before < len(prompts)  # some requests shared a batch
    assert [r["choices"][0]["text"] for _, r in replies[:2]] == alone


def test_streaming_replies_are_server_sent_events(server):
    status, raw = _call(server.base_url + "/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
                         "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    status, full = _call(server.base_url + "/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        full["choices"][0]["message"]["content"]


def test_errors_use_openai_error_bodies(server):
    url = server.base_url
    status, reply = _call(url + "/completions", {"prompt": "x", "model": "other"})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and "tiny-worker" in reply["error"]["message"]
    status, reply = _call(url + "/completions", {"prompt": 3})
    assert status == 400 and reply["error"]["param"] == "prompt"
    status, reply = _call(url + "/completions", {"prompt": "x", "temperature": "hot"})
    assert status == 400 and reply["error"]["param"] == "temperature"
    status, reply = _call(url + "/completions", {"prompt": "x", "n": 2})
    assert status == 400 and reply["error"]["param"] == "n"
    status, reply = _call(url + "/completions", {"prompt": "word " * 600, "max_tokens": 4})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = _call(url + "/nowhere", {"prompt": "x"})
    assert status == 404
    status, reply = _call(url + "/chat/completions", {"messages": [{"role": "user"}]})
    assert status == 400 and reply["error"]["param"] == "messages"


def test_api_key_is_required_when_set(loaded):
    engine = BatchingEngine(loaded.generator(), max_wait_seconds=0.0)
    with ModelServer(engine, "m", port=0, api_key="sekret") as running:
        status, reply = _call(running.base_url + "/models")
        assert status == 401 and reply["error"]["code"] == "invalid_api_key" and "sekret" not in json.dumps(reply)
        assert _call(running.base_url + "/models", key="sekret")[0] == 200
    engine.close()


def test_serve_command_starts_and_answers(tiny_llama_checkpoint, capsys):
    from megalign.cli import build_parser
    from megalign.inference.serve_cli import build_server

    args = build_parser("serve").parse_args([str(tiny_llama_checkpoint), "--port", "0", "--model-name", "w"])
    server = build_server(args)
    assert "as 'w' at http://127.0.0.1:" in capsys.readouterr().out
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, reply = _call(server.base_url + "/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0})
        assert status == 200 and reply["model"] == "w"
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.engine.close()
