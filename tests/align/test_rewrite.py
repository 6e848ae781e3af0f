"""The rewrite stage: pieces joined back, validation policy, faults, sharding, SIGKILL + resume, and the
in-process worker against `megalign serve` of the same checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalign.align.openai_client import ClientConfig
from megalign.align.records import StageInput
from megalign.align.rewrite import run_rewrite
from megalign.align.rewrite_backends import LocalBackend, PieceRequest, ServerBackend

from fault_server import FaultServer

PHONE = " للتواصل: 0501234567"


def _documents(n: int = 12):
    docs = {}
    for i in range(n):
        if i % 3 == 2:
            docs[f"e{i}"] = f"Item {i}: the library of city {i} opened in {2000 + i} with {i * 10 + 5} shelves.{PHONE}"
        else:
            first = f"الفقرة الأولى من الخبر {i}: افتتحت مكتبة المدينة عام {2000 + i} وفيها {i * 10 + 5} رفا.{PHONE}"
            second = f"الفقرة الثانية من الخبر {i}: زارها {i * 100 + 7} شخص في الأسبوع الأول."
            docs[f"a{i}"] = first + "\n\n" + second
    return docs


def _corpus(path: Path, docs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for rid, text in docs.items():
            handle.write(json.dumps({"id": rid, "text": text, "source": "test"}, ensure_ascii=False) + "\n")
    return path


def _polish(text: str) -> str:
    """A well-behaved worker: removes the phone number."""
    return text.replace(PHONE, "")


def _server_backend(server: FaultServer, **overrides) -> ServerBackend:
    values = dict(base_urls=[server.base_url], model=server.model, timeout=0.5, max_retries=2, backoff_base=0.01,
                  backoff_max=0.05, seed=0, max_concurrency=4, retry_invalid=1, api_key_env=None)
    values.update(overrides)
    return ServerBackend(ClientConfig(**values))


def _by_id(directory: Path):
    return {r["id"]: r for r in StageInput([str(directory)])}


def test_pieces_are_rewritten_validated_and_joined(tmp_path):
    docs = _documents(6)
    corpus = _corpus(tmp_path / "corpus", docs)
    plan = {"الثانية من الخبر 1:": ["500"] * 5, "city 5": ["reply:Sure! Here is the rewritten text."] * 3}
    with FaultServer(plan, respond=_polish) as server:
        summary = run_rewrite([str(corpus)], str(tmp_path / "out"), _server_backend(server), max_piece=90)
    records = _by_id(tmp_path / "out")
    assert sorted(records) == sorted(docs)
    good = records["a0"]
    assert good["status"] == "rewritten" and good["pieces"] == 2 and good["source"] == "test"
    assert good["aligned_text"] == _polish(docs["a0"])  # both pieces polished, the paragraph break kept
    assert good["worker"] == "fault-model" and good["guideline_version"] == "polishing-v1"
    assert records["e2"]["status"] == "rewritten" and records["e2"]["pieces"] == 1
    assert records["a1"]["status"] == "kept_original" and records["a1"]["aligned_text"] == docs["a1"]
    assert records["a1"]["reason"] == "piece 2/2: http_500"
    assert records["e5"]["status"] == "kept_original" and records["e5"]["reason"] == "meta_text"
    assert summary["statuses"] == {"rewritten": 4, "kept_original": 2}

    with FaultServer(plan, respond=_polish) as server:
        run_rewrite([str(corpus)], str(tmp_path / "drop"), _server_backend(server), on_invalid="drop", max_piece=90)
    dropped = _by_id(tmp_path / "drop")
    assert dropped["a1"]["status"] == "dropped" and "aligned_text" not in dropped["a1"]


def test_shards_together_equal_one_run(tmp_path):
    docs = _documents(9)
    corpus = _corpus(tmp_path / "corpus", docs)
    with FaultServer(respond=_polish) as server:
        run_rewrite([str(corpus)], str(tmp_path / "one"), _server_backend(server), max_piece=90)
        for shard in range(3):
            run_rewrite([str(corpus)], str(tmp_path / "three"), _server_backend(server), shard_index=shard,
                        num_shards=3, max_piece=90)
    assert _by_id(tmp_path / "one") == _by_id(tmp_path / "three")


def _rewrite_command(corpus: Path, output: Path, base_url: str):
    return [sys.executable, "-m", "megalign.cli", "align", "rewrite", "--input", str(corpus), "--output", str(output),
            "--base-url", base_url, "--model", "fault-model", "--concurrency", "2", "--max-piece-chars", "90",
            "--request-timeout", "5", "--api-key-env", "NO_SUCH_KEY_VARIABLE"]


def test_sigkill_mid_run_then_rerun_gives_each_record_once_as_an_uninterrupted_run(tmp_path):
    docs = _documents(24)
    corpus = _corpus(tmp_path / "corpus", docs)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with FaultServer(respond=_polish, latency=0.05) as server:
        process = subprocess.Popen(_rewrite_command(corpus, tmp_path / "killed", server.base_url), env=environment,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        partial = tmp_path / "killed" / "part-00000-of-00001.jsonl.partial"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        written = partial.read_bytes().count(b"\n")
        assert 5 <= written < len(docs), "the run was not killed mid-way"
        rerun = subprocess.run(_rewrite_command(corpus, tmp_path / "killed", server.base_url), env=environment,
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        straight = subprocess.run(_rewrite_command(corpus, tmp_path / "straight", server.base_url), env=environment,
                                  capture_output=True, text=True, timeout=120)
        assert straight.returncode == 0, straight.stderr[-2000:]
    lines = (tmp_path / "killed" / "part-00000-of-00001.jsonl").read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(docs)  # each id exactly once
    assert _by_id(tmp_path / "killed") == _by_id(tmp_path / "straight")
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["missing_shards"] == [] and manifest["shards"]["0"]["summary"]["resumed"] >= 5


def test_in_process_worker_equals_megalign_serve(tmp_path, tiny_llama_checkpoint):
    from megalign.inference.batching import BatchingEngine
    from megalign.inference.server import ModelServer

    docs = dict(list(_documents(6).items())[:4])
    corpus = _corpus(tmp_path / "corpus", docs)
    local = LocalBackend(str(tiny_llama_checkpoint), batch_size=1, max_new_tokens_ratio=100.0, max_new_tokens=12)
    local_summary = run_rewrite([str(corpus)], str(tmp_path / "local"), local, max_piece=40)
    assert sum(local_summary["statuses"].values()) == len(docs)
    assert local_summary["summary"]["worker_usage"]["completion_tokens"] > 0
    engine = BatchingEngine(local.generator, max_batch_size=1, max_wait_seconds=0.0)
    with ModelServer(engine, "tiny-worker", port=0) as served:
        backend = ServerBackend(ClientConfig(base_urls=[served.base_url], model="tiny-worker", max_concurrency=1,
                                             api_key_env=None, retry_invalid=0, accept_truncated=True,
                                             timeout=60, max_tokens=12))
        remote = _by_id_after(run_rewrite, [str(corpus)], str(tmp_path / "served"), backend, 40)
    engine.close()
    requests = [PieceRequest(("doc", i), [{"role": "user", "content": text}])
                for i, text in enumerate(["مرحبا بكم في المدينة", "The library opened", "نص ثالث قصير"])]
    said_locally, said_by_server = {}, {}
    local.run(requests, lambda r: said_locally.__setitem__(r.key, (r.text, r.finish_reason, r.completion_tokens)))
    engine = BatchingEngine(local.generator, max_batch_size=4, max_wait_seconds=0.0)
    with ModelServer(engine, "tiny-worker", port=0) as served:
        backend = ServerBackend(ClientConfig(base_urls=[served.base_url], model="tiny-worker", max_concurrency=3,
                                             api_key_env=None, accept_truncated=True, timeout=60, max_tokens=12))
        backend.run(requests, lambda r: said_by_server.__setitem__(r.key, (r.text, r.finish_reason,
                                                                           r.completion_tokens)))
    engine.close()
    assert said_locally == said_by_server and len(said_locally) == 3
    mine = _by_id(tmp_path / "local")
    assert sorted(mine) == sorted(remote) == sorted(docs)  # pieces differ: tokens here, characters for servers
    for record in list(mine.values()) + list(remote.values()):
        assert record["status"] in ("rewritten", "kept_original") and record["usage"]["completion_tokens"] > 0


def _by_id_after(run, inputs, output, backend, max_piece):
    run(inputs, output, backend, max_piece=max_piece)
    return _by_id(Path(output))


def test_worker_must_be_given_one_way(tmp_path):
    from megalign.cli import main

    corpus = _corpus(tmp_path / "corpus", _documents(3))
    assert main(["align", "rewrite", "--input", str(corpus), "--output", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        main(["align", "rewrite", "--input", str(corpus)])


def test_a_blank_document_is_kept_with_its_reason(tmp_path):
    corpus = _corpus(tmp_path / "corpus", {"blank": "  \n ", "e2": _documents(3)["e2"]})
    with FaultServer(respond=_polish) as server:
        summary = run_rewrite([str(corpus)], str(tmp_path / "out"), _server_backend(server), max_piece=90)
        assert server.total_requests == 1  # nothing is sent for the blank document
    records = _by_id(tmp_path / "out")
    assert records["blank"]["status"] == "kept_original" and records["blank"]["reason"] == "no_text"
    assert summary["statuses"] == {"kept_original": 1, "rewritten": 1}


def test_default_piece_size_fits_the_local_workers_context(tmp_path, tiny_llama_checkpoint):
    import math

    from megalign.align.chunking import split_document
    from megalign.align.guidelines import load_guidelines
    from megalign.inference.generation import chat_prompt

    long_document = "\n\n".join(f"الفقرة رقم {i} تتحدث عن تاريخ المدينة القديمة وأسواقها ومكتباتها." for i in range(30))
    corpus = _corpus(tmp_path / "corpus", {"long": long_document})
    local = LocalBackend(str(tiny_llama_checkpoint), batch_size=4, max_new_tokens=4)
    summary = run_rewrite([str(corpus)], str(tmp_path / "out"), local)
    record = _by_id(tmp_path / "out")["long"]
    assert record["pieces"] > 1 and summary["summary"]["worker_usage"]["pieces"] == record["pieces"]
    max_piece = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["max_piece"]
    guidelines = load_guidelines()
    for piece, _ in split_document(long_document, max_piece, local.count_tokens):
        prompt = local.generator.encode(chat_prompt(local.loaded.tokenizer, guidelines.worker_messages(piece, "ar")))
        room = local.generator.max_length - len(prompt)  # a rewrite 1.5x the piece (+16) always fits
        assert room >= math.ceil(1.5 * local.count_tokens(piece)) + 16, (len(prompt), room)
