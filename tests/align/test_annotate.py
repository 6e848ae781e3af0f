"""The annotate stage against a fault-injecting OpenAI-compatible server: every record ends exactly once,
with the right status, across HTTP errors, timeouts, garbage replies, invalid rewrites and a stopped run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalign.align.annotate import run_annotate
from megalign.align.build_sft import build_sft
from megalign.align.openai_client import ClientConfig, EndpointError
from megalign.align.records import StageInput

from fault_server import FaultServer

DOCS = {
    f"d{i}": text for i, text in enumerate([
        "تقرير رقم 101 عن افتتاح مكتبة المدينة عام 2019 بحضور 300 زائر.",
        "خبر رقم 102: ارتفعت درجات الحرارة إلى 45 درجة في الرياض يوم الأحد.",
        "Report 103: the museum in Jeddah opened in 2021 with 12 galleries.",
        "مقال رقم 104 عن مسابقة القراءة التي شارك فيها 1500 طالب في 2022.",
        "Note 105: the bridge is 800 metres long and carries 40000 cars a day.",
        "نص رقم 106 عن معرض الكتاب الذي استمر 10 أيام وزاره 80000 شخص.",
    ])
}


def _corpus(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "seed.jsonl", "w", encoding="utf-8") as handle:
        for rid, text in DOCS.items():
            handle.write(json.dumps({"id": rid, "text": text + " اتصل بنا على 0501234567"}, ensure_ascii=False) + "\n")
    return path


def _expert(prompt: str) -> str:
    """A well-behaved expert: the document with its phone number removed."""
    for text in DOCS.values():
        if text in prompt:
            return text
    return "?"


def _config(server: FaultServer, **overrides) -> ClientConfig:
    values = dict(base_urls=[server.base_url], model=server.model, timeout=0.5, max_retries=3, backoff_base=0.01,
                  backoff_max=0.05, seed=0, max_concurrency=3, retry_invalid=1, api_key_env=None)
    values.update(overrides)
    return ClientConfig(**values)


def _by_id(directory: Path):
    return {r["id"]: r for r in StageInput([str(directory)])}


def test_faults_are_retried_and_every_record_ends_once_with_its_status(tmp_path):
    plan = {"101": ["500", "ok"], "102": ["429:0.05", "ok"], "103": ["malformed", "drop", "ok"],
            "104": ["delay:2", "ok"], "105": ["500"] * 10, "106": ["reply:حسنا، إليك النص المعاد صياغته:"] * 5}
    with FaultServer(plan, respond=_expert) as server:
        summary = run_annotate([str(_corpus(tmp_path / "seed"))], str(tmp_path / "pairs"), _config(server),
                               progress=False)
        assert server.attempts("101") == 2 and server.attempts("103") == 3 and server.attempts("104") == 2
        assert server.attempts("105") == 4 and server.attempts("106") == 2  # 1 + retry_invalid
    records = _by_id(tmp_path / "pairs")
    assert sorted(records) == sorted(DOCS)
    for rid in ("d0", "d1", "d2", "d3"):
        assert records[rid]["status"] == "annotated" and records[rid]["rewritten"] == DOCS[rid], rid
        assert records[rid]["guideline_version"] == "polishing-v1" and records[rid]["expert"] == "fault-model"
    assert records["d4"]["status"] == "failed" and records["d4"]["reason"] == "http_500"
    assert records["d5"]["status"] == "failed" and records["d5"]["reason"] == "invalid_reply"
    assert records["d0"]["language"] == "ar" and records["d2"]["language"] == "en"
    assert summary["statuses"] == {"annotated": 4, "failed": 2}
    assert summary["summary"]["client"]["completion_tokens"] > 0

    counts = build_sft([str(tmp_path / "pairs")], str(tmp_path / "sft.jsonl"))
    assert counts == {"written": 4, "skipped_not_annotated": 2}
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["id"] for r in sft} == {"d0", "d1", "d2", "d3"}
    first = next(r for r in sft if r["id"] == "d0")
    assert first["response"] == DOCS["d0"] and DOCS["d0"] in first["prompt"] and first["system"]


def test_a_stopped_run_resumes_without_asking_twice(tmp_path):
    corpus = _corpus(tmp_path / "seed")
    with FaultServer({"104": ["401"]}, respond=_expert) as server:
        with pytest.raises(EndpointError, match="401"):
            run_annotate([str(corpus)], str(tmp_path / "pairs"), _config(server, max_concurrency=1), progress=False)
        done_before = set(_partial_ids(tmp_path / "pairs"))
        assert "d3" not in done_before and {"d0", "d1", "d2"} <= done_before
        run_annotate([str(corpus)], str(tmp_path / "pairs"), _config(server, max_concurrency=1), progress=False)
        for rid in done_before:
            assert server.attempts(str(101 + int(rid[1:]))) == 1  # not asked again
    records = _by_id(tmp_path / "pairs")
    assert sorted(records) == sorted(DOCS) and all(r["status"] == "annotated" for r in records.values())


def _partial_ids(directory: Path):
    partial = next(directory.glob("*.jsonl.partial"))
    return [json.loads(line)["id"] for line in partial.read_text(encoding="utf-8").splitlines()]


def test_shards_together_equal_one_run(tmp_path):
    corpus = _corpus(tmp_path / "seed")
    with FaultServer(respond=_expert) as server:
        run_annotate([str(corpus)], str(tmp_path / "one"), _config(server), progress=False)
        for shard in range(3):
            run_annotate([str(corpus)], str(tmp_path / "three"), _config(server), shard_index=shard, num_shards=3,
                         progress=False)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("attempts",)}  # noqa: E731
    one, three = _by_id(tmp_path / "one"), _by_id(tmp_path / "three")
    assert {k: strip(v) for k, v in one.items()} == {k: strip(v) for k, v in three.items()}
