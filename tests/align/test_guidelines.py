"""Polishing guidelines: the packaged file, prompt rendering, SFT records, custom languages, schema errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megalign.align.guidelines import AREAS, default_guidelines_path, detect_language, load_guidelines
from megalign.data.sft import conversation_from_record
from megalign.errors import ConfigError


def test_packaged_guidelines_cover_arabic_and_english() -> None:
    guidelines = load_guidelines()
    assert guidelines.version == "polishing-v1"
    assert list(guidelines.languages) == ["ar", "en"]
    assert guidelines.scripts == {"ar": "arabic", "en": "latin"}
    for section in guidelines.languages.values():
        assert set(section.areas) == set(AREAS)
        assert all(len(rules) >= 4 for _, rules in section.areas.values())
    assert Path(default_guidelines_path()).is_file()
    assert load_guidelines(default_guidelines_path()).languages == guidelines.languages


def test_expert_messages_carry_rules_and_document() -> None:
    guidelines = load_guidelines()
    document = "اتصل بنا على 0555555555 {للعروض}"
    system, user = guidelines.expert_messages(document, "ar")
    assert system["role"] == "system" and user["role"] == "user"
    assert "## ضبط المحتوى" in system["content"] and "احذف أرقام الهواتف" in system["content"]
    assert "{rules}" not in system["content"] and "العربية" in system["content"]
    assert user["content"].endswith(document)  # braces in the document survive rendering
    en_system, en_user = guidelines.expert_messages("Buy now!", "en")
    assert "## Knowledge preservation" in en_system["content"] and en_user["content"].endswith("Buy now!")
    assert "rewritten text only" in en_system["content"]


def test_worker_messages_and_sft_record_match(tmp_path: Path) -> None:
    guidelines = load_guidelines()
    original, rewritten = "مرحبا!!! اضغط هنا", "مرحبًا!"
    messages = guidelines.worker_messages(original, "ar")
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == original
    record = guidelines.worker_sft_record(original, rewritten, "ar")
    assert record == {"system": messages[0]["content"], "prompt": original, "response": rewritten}
    # The record is what `megalign preprocess --sft` accepts, and it renders as [system, user, assistant].
    assert conversation_from_record(record) == messages + [{"role": "assistant", "content": rewritten}]


def test_language_detected_when_not_given() -> None:
    guidelines = load_guidelines()
    assert guidelines.detect_language("أعلنت شركة Apple اليوم") == "ar"
    assert guidelines.detect_language("Apple announced today") == "en"
    assert detect_language("Bonjour", guidelines.languages) == "en"
    arabic = guidelines.worker_messages("أعلنت الوزارة")[0]["content"]
    assert arabic == guidelines.languages["ar"].worker_system
    with pytest.raises(ConfigError, match="no guidelines for language 'fr'.*covers ar, en"):
        guidelines.expert_messages("Bonjour", "fr")


def _write(path: Path, data: object) -> str:
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def _custom(tmp_path: Path) -> dict:
    data = yaml.safe_load(Path(default_guidelines_path()).read_text(encoding="utf-8"))
    french = {
        "name": "français", "script": "latin",
        "areas": {area: {"title": area.replace("_", " "), "rules": [f"Règle {area} 1.", f"Règle {area} 2."]}
                  for area in AREAS},
        "expert": {"system": "Vous êtes un éditeur ({language_name}).\n{rules}", "user": "Texte :\n{document}"},
        "worker": {"system": "Améliorez le texte.", "user": "{document}"},
    }
    return {"version": "custom-1", "languages": {"fr": french, "ar": data["languages"]["ar"]}}


def test_custom_guideline_file_with_a_new_language(tmp_path: Path) -> None:
    guidelines = load_guidelines(_write(tmp_path / "g.yaml", _custom(tmp_path)))
    assert guidelines.version == "custom-1" and list(guidelines.languages) == ["fr", "ar"]
    system, user = guidelines.expert_messages("Achetez maintenant !", "fr")
    assert system["content"].startswith("Vous êtes un éditeur (français).\n## format\n- Règle format 1.")
    assert user["content"] == "Texte :\nAchetez maintenant !"
    assert guidelines.detect_language("Le conseil a voté le budget.") == "fr"
    assert guidelines.detect_language("صوت المجلس على الميزانية") == "ar"
    assert guidelines.worker_sft_record("a b", "a.", "fr") == {"system": "Améliorez le texte.", "prompt": "a b",
                                                              "response": "a."}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("version"), r"g.yaml: missing field 'version'"),
    (lambda d: d.update(versoin="x"), r"g.yaml: unknown field 'versoin'; did you mean 'version'\?"),
    (lambda d: d.update(languages={}), r"g.yaml: languages: expected a mapping"),
    (lambda d: d["languages"]["fr"].pop("script"), r"g.yaml: languages.fr: missing field 'script'"),
    (lambda d: d["languages"]["fr"].update(script="runic"), r"languages.fr.script: unknown script 'runic'"),
    (lambda d: d["languages"]["fr"]["areas"].pop("values"), r"languages.fr.areas: missing field 'values'"),
    (lambda d: d["languages"]["fr"]["areas"].update(style={}), r"languages.fr.areas: unknown field 'style'"),
    (lambda d: d["languages"]["fr"]["areas"]["format"].update(rules=[]),
     r"languages.fr.areas.format.rules: expected a non-empty list"),
    (lambda d: d["languages"]["fr"]["areas"]["values"]["rules"].append(3),
     r"languages.fr.areas.values.rules\[2\]: expected non-empty text"),
    (lambda d: d["languages"]["fr"]["expert"].update(user="Texte sans placeholder"),
     r"languages.fr.expert.user: must contain the \{document\} placeholder"),
    (lambda d: d["languages"]["fr"]["worker"].update(system="Bonjour {nom}"),
     r"languages.fr.worker.system: unknown placeholder \{nom\}"),
    (lambda d: d["languages"]["fr"]["worker"].update(user="{document"),
     r"languages.fr.worker.user: malformed placeholder"),
])
def test_schema_errors_name_file_and_field(tmp_path: Path, mutate, message: str) -> None:
    data = _custom(tmp_path)
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        load_guidelines(_write(tmp_path / "g.yaml", data))


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: cannot read guidelines"):
        load_guidelines(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("version: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_guidelines(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping with version, languages"):
        load_guidelines(str(tmp_path / "list.yaml"))
