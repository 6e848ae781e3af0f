"""The rule-based stand-in expert: polishing rules, template matching, and annotate against it and against
a real `megalign serve` on loopback (every record ends exactly once)."""
from __future__ import annotations

import json

from megalign.align.annotate import run_annotate
from megalign.align.guidelines import load_guidelines
from megalign.align.openai_client import ClientConfig
from megalign.align.records import StageInput
from megalign.align.rule_based_expert import RuleBasedExpert, RuleBasedExpertServer, polish

ARABIC = "افتتح المتحف عام 2015 وزاره 4000 شخص. للتواصل 0501234567 أو info@museum.sa\n\n\nاضغط هنا للمزيد"
ENGLISH = "The bridge opened in 1998. Click here to buy now! Visit https://ads.example.com today."


def test_polish_removes_contacts_and_spam_and_keeps_the_rest():
    expert = RuleBasedExpert()
    assert polish("a  b\n\n\n\nc https://x.io") == "a b\n\nc"
    english = polish(ENGLISH, expert.spam["en"])
    assert "https" not in english and "Click here" not in english and english.startswith("The bridge opened in 1998.")
    arabic = polish(ARABIC, expert.spam["ar"])
    assert "0501234567" not in arabic and "@" not in arabic and "افتتح المتحف عام 2015 وزاره 4000 شخص." in arabic


def test_documents_are_found_in_expert_and_worker_prompts():
    guidelines = load_guidelines()
    expert = RuleBasedExpert(guidelines)
    for messages in (guidelines.expert_messages(ARABIC, "ar"), guidelines.worker_messages(ENGLISH, "en")):
        language, document = expert.document_of(messages[-1]["content"])
        assert document in (ARABIC.strip(), ENGLISH.strip()) and language in ("ar", "en")
    assert expert.reply(guidelines.expert_messages(ENGLISH, "en")) == polish(ENGLISH, expert.spam["en"])


def _seed(path, texts):
    path.mkdir()
    (path / "seed.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": t}, ensure_ascii=False) + "\n"
                                             for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_annotate_against_the_stand_in_expert(tmp_path):
    seed = _seed(tmp_path / "seed", [ARABIC, ENGLISH, "Nothing to change here."])
    with RuleBasedExpertServer() as server:
        config = ClientConfig(base_urls=[server.base_url], model=server.model_name, api_key_env=None, timeout=10)
        summary = run_annotate([str(seed)], str(tmp_path / "pairs"), config, progress=False)
    records = {r["id"]: r for r in StageInput([str(tmp_path / "pairs")])}
    assert summary["statuses"] == {"annotated": 3}
    assert records["s1"]["rewritten"] == polish(ENGLISH, RuleBasedExpert().spam["en"])
    assert records["s2"]["rewritten"] == "Nothing to change here."


def test_annotate_against_megalign_serve(tmp_path, tiny_llama_checkpoint):
    from megalign.inference.batching import BatchingEngine
    from megalign.inference.model_loading import load_model
    from megalign.inference.server import ModelServer

    import yaml

    from megalign.align.guidelines import default_guidelines_path

    seed = _seed(tmp_path / "seed", [ARABIC, ENGLISH, "Nothing to change here."])
    data = yaml.safe_load(open(default_guidelines_path(), encoding="utf-8"))
    for section in data["languages"].values():  # short expert prompts: the tiny model has 512 positions
        section["expert"] = {"system": "Rewrite the text.", "user": "{document}"}
    short = tmp_path / "short_guidelines.yaml"
    short.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    engine = BatchingEngine(load_model(tiny_llama_checkpoint).generator(), max_wait_seconds=0.01)
    with ModelServer(engine, "tiny", port=0) as server:
        config = ClientConfig(base_urls=[server.base_url], model="tiny", api_key_env=None, timeout=60,
                              max_tokens=8, retry_invalid=0)
        summary = run_annotate([str(seed)], str(tmp_path / "pairs"), config, str(short), progress=False)
    engine.close()
    records = list(StageInput([str(tmp_path / "pairs")]))
    assert sorted(r["id"] for r in records) == ["s0", "s1", "s2"]
    # a random model's 8-token replies are cut off: each record ends once, as failed, with the reason
    assert summary["statuses"] == {"failed": 3} and {r["reason"] for r in records} <= {"truncated", "invalid_reply"}
    assert all(r["usage"]["completion_tokens"] > 0 for r in records)
