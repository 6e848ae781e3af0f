"""The quality report: statistics of both sides, statuses and reasons, kept knowledge, perplexity and PNGs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalign.align.report import build_report
from megalign.align.stage_output import ShardOutput
from megalign.errors import ConfigError

RECORDS = [
    {"id": "a", "text": "Visit http://spam.example.com now! Click here to buy now. The bridge opened in 1998 and "
                        "is 800 metres long. Those people are vermin.",
     "aligned_text": "The bridge opened in 1998 and is 800 metres long.", "status": "rewritten", "reason": None,
     "language": "en"},
    {"id": "b", "text": "افتتح المتحف عام 2015 وزاره 4000 شخص. للتواصل 0501234567 أو info@museum.sa",
     "aligned_text": "افتتح المتحف عام 2015 وزاره 4000 شخص.", "status": "rewritten", "reason": None,
     "language": "ar"},
    {"id": "c", "text": "A short note that stayed as it was.", "aligned_text": "A short note that stayed as it was.",
     "status": "kept_original", "reason": "piece 2/3: lost_numbers", "language": "en"},
    {"id": "d", "text": "Buy now!!! Click here!!!", "status": "dropped", "reason": "meta_text", "language": "en"},
]


def _aligned(path: Path) -> Path:
    with ShardOutput(path, "rewrite") as out:
        for record in RECORDS:
            out.write(dict(record))
        out.finish()
    return path


def test_report_compares_both_sides(tmp_path):
    report = build_report([str(_aligned(tmp_path / "aligned"))], str(tmp_path / "report"), plots=False)
    assert report["documents"] == 4 and report["original"]["documents"] == 4 and report["aligned"]["documents"] == 3
    assert report["statuses"] == {"rewritten": 2, "kept_original": 1, "dropped": 1}
    assert report["validation_reasons"] == {"lost_numbers": 1, "meta_text": 1}
    assert report["original"]["counts"]["urls"] == 1 and report["aligned"]["counts"].get("urls", 0) == 0
    assert report["removed"]["phone_numbers"] == 1 and report["removed"]["emails"] == 1
    assert report["removed"]["spam_markers"] >= 4
    assert report["original"]["toxicity"]["flagged"] >= 1 and report["aligned"]["toxicity"]["flagged"] == 0
    kept = report["knowledge_preservation"]
    assert kept["rewritten_documents"] == 2 and kept["number_share"]["median"] == 1.0
    assert [e["id"] for e in report["examples"]] == ["a", "b"]
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["statuses"] == report["statuses"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| urls | 1 | 0 |" in markdown and "- lost_numbers: 1" in markdown


def test_perplexity_and_figures_with_a_reference_model(tmp_path, tiny_llama_checkpoint):
    pytest.importorskip("matplotlib")
    report = build_report([str(_aligned(tmp_path / "aligned"))], str(tmp_path / "report"),
                          load=str(tiny_llama_checkpoint))
    ppl = report["perplexity"]
    assert ppl["original"]["documents"] == 4 and ppl["aligned"]["documents"] == 3
    assert ppl["original"]["median"] > 1.0
    assert report["tokens"]["original"]["tokens"] > report["tokens"]["aligned"]["tokens"] > 0
    for name in ("perplexity.png", "length.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![perplexity](perplexity.png)" in (tmp_path / "report" / "report.md").read_text()


def test_original_by_id_classifier_plugin_and_errors(tmp_path, monkeypatch):
    aligned = _aligned(tmp_path / "aligned")
    originals = tmp_path / "orig.jsonl"
    originals.write_text("\n".join(json.dumps({"id": r["id"], "text": r["text"] + " extra"}) for r in RECORDS) + "\n")
    module = tmp_path / "my_classifier.py"
    module.write_text("def score(text):\n    return {'rude': 1.0 if 'vermin' in text else 0.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    report = build_report([str(aligned)], str(tmp_path / "r"), original=[str(originals)],
                          toxicity_classifier="my_classifier:score", plots=False)
    assert report["original"]["characters"] == sum(len(r["text"]) + 6 for r in RECORDS)
    assert report["original"]["toxicity"]["flagged"] == 1 and report["aligned"]["toxicity"]["flagged"] == 0
    with pytest.raises(ConfigError, match="cannot import it"):
        build_report([str(aligned)], str(tmp_path / "r2"), toxicity_classifier="nowhere:fn", plots=False)
    (tmp_path / "short.jsonl").write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    with pytest.raises(ConfigError, match="has no record with id"):
        build_report([str(aligned)], str(tmp_path / "r3"), original=[str(tmp_path / "short.jsonl")], plots=False)
    with pytest.raises(ConfigError, match="has no 'status'"):
        build_report([str(tmp_path / "short.jsonl")], str(tmp_path / "r4"), plots=False)
