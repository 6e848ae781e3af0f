"""Polishing guidelines: the rules the expert and the worker rewrite by, and the prompts that carry them.

A guidelines file (YAML; the packaged default is megalign/align/guidelines/polishing_v1.yaml, whose
header documents the layout) holds a `version` and one section per language. Each section names its
`script`, states rules in the paper's four areas (format, values, content moderation, knowledge
preservation) and gives two prompt templates: the expert's (system + user) and the worker's (system +
user, used alike for SFT pairs and inference). Languages are configuration: a file may add any
language (`fr`, `ur`, ...) with a known script.

    guidelines = load_guidelines()                       # or load_guidelines("my_guidelines.yaml")
    messages = guidelines.expert_messages(text, "ar")    # [{"role": "system", ...}, {"role": "user", ...}]
    record = guidelines.worker_sft_record(original, rewritten, "ar")   # {"system", "prompt", "response"}
"""

from __future__ import annotations

import difflib
import importlib.resources
import string
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import yaml

from megalign.align.text_signals import SCRIPTS
from megalign.align.text_signals import detect_language as detect_language_by_script
from megalign.errors import ConfigError

__all__ = [
    "AREAS",
    "PLACEHOLDERS",
    "Guidelines",
    "LanguageGuidelines",
    "default_guidelines_path",
    "detect_language",
    "load_guidelines",
    "parse_guidelines",
]

#: The four areas of the polishing guidelines, in the order they are rendered into prompts.
AREAS = ("format", "values", "content_moderation", "knowledge_preservation")
#: Placeholders a template may use; user templates must contain {document}.
PLACEHOLDERS = ("document", "rules", "language_name")
_PACKAGED = "polishing_v1.yaml"

Messages = List[Dict[str, str]]


@dataclass(frozen=True)
class LanguageGuidelines:
    """One language section: its rules by area and its prompt templates."""

    code: str
    name: str
    script: str
    areas: Dict[str, Tuple[str, Tuple[str, ...]]]  # area -> (title, rules)
    expert_system: str
    expert_user: str
    worker_system: str
    worker_user: str

    def rules_text(self) -> str:
        """The four areas as headed bullet lists (what {rules} renders to)."""
        blocks = []
        for area in AREAS:
            title, rules = self.areas[area]
            blocks.append(f"## {title}\n" + "\n".join(f"- {rule}" for rule in rules))
        return "\n\n".join(blocks)

    def _render(self, template: str, document: str) -> str:
        return template.format(document=document, rules=self.rules_text(), language_name=self.name).strip()

    def expert_messages(self, document: str) -> Messages:
        """System and user chat messages asking the expert to rewrite `document`."""
        return [
            {"role": "system", "content": self._render(self.expert_system, document)},
            {"role": "user", "content": self._render(self.expert_user, document)},
        ]

    def worker_messages(self, document: str) -> Messages:
        """System and user chat messages for the worker (the same for its SFT pairs and at inference)."""
        return [
            {"role": "system", "content": self._render(self.worker_system, document)},
            {"role": "user", "content": self._render(self.worker_user, document)},
        ]


def detect_language(text: str, languages: Mapping[str, LanguageGuidelines]) -> str:
    """The code of the section in `languages` whose script has the largest letter share in `text`
    (ties between languages of one script go to the first listed; text without letters -> the first)."""
    return detect_language_by_script(text, {code: section.script for code, section in languages.items()})


@dataclass(frozen=True)
class Guidelines:
    """A loaded guidelines file: its version, its language sections, and where it came from."""

    version: str
    languages: Dict[str, LanguageGuidelines]
    source: str

    @property
    def scripts(self) -> Dict[str, str]:
        """Language code -> script name, e.g. for ValidationConfig(scripts=...)."""
        return {code: section.script for code, section in self.languages.items()}

    def detect_language(self, text: str) -> str:
        """The language section `text` belongs to (see detect_language)."""
        return detect_language(text, self.languages)

    def section(self, language: Optional[str], document: str = "") -> LanguageGuidelines:
        """The section of `language`, detected from `document` when None; ConfigError for an unknown code."""
        code = self.detect_language(document) if language is None else language
        if code not in self.languages:
            raise ConfigError(
                f"{self.source}: no guidelines for language {code!r}; this file covers "
                f"{', '.join(self.languages)} (add a section under 'languages' for it)"
            )
        return self.languages[code]

    def expert_messages(self, document: str, language: Optional[str] = None) -> Messages:
        """[system, user] messages for the expert rewriting `document` (language detected when None)."""
        return self.section(language, document).expert_messages(document)

    def worker_messages(self, document: str, language: Optional[str] = None) -> Messages:
        """[system, user] messages for the worker rewriting `document` (language detected when None)."""
        return self.section(language, document).worker_messages(document)

    def worker_sft_record(self, original: str, rewritten: str, language: Optional[str] = None) -> Dict[str, str]:
        """One SFT training record {"system", "prompt", "response"} as `megalign preprocess --sft` reads it:
        the worker's messages for `original`, with `rewritten` as the reply to learn."""
        system, user = self.worker_messages(original, language)
        return {"system": system["content"], "prompt": user["content"], "response": rewritten}


# ---- loading and schema checks -------------------------------------------------------------------------------
def default_guidelines_path() -> str:
    """Path of the packaged guidelines file (polishing_v1.yaml)."""
    return str(importlib.resources.files("megalign.align") / "guidelines" / _PACKAGED)


def _mapping(value: object, where: str, known: Tuple[str, ...], required: Tuple[str, ...]) -> Dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(known)}, got {type(value).__name__}")
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"{where}: unknown field {key!r}{hint}")
    for key in required:
        if key not in value:
            raise ConfigError(f"{where}: missing field {key!r}")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected non-empty text, got {value!r}")
    return value


def _template(value: object, where: str, needs_document: bool) -> str:
    text = _text(value, where)
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:
        raise ConfigError(f"{where}: malformed placeholder ({error}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(name for name in names if name not in PLACEHOLDERS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown placeholder {{{unknown[0]}}}; placeholders are "
            + ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
        )
    if needs_document and "document" not in names:
        raise ConfigError(f"{where}: must contain the {{document}} placeholder")
    return text


def _language(code: str, value: object, where: str) -> LanguageGuidelines:
    section = _mapping(
        value, where, ("name", "script", "areas", "expert", "worker"), ("name", "script", "areas", "expert", "worker")
    )
    script = _text(section["script"], f"{where}.script")
    if script not in SCRIPTS:
        raise ConfigError(f"{where}.script: unknown script {script!r}; known scripts: {', '.join(SCRIPTS)}")
    areas_value = _mapping(section["areas"], f"{where}.areas", AREAS, AREAS)
    areas: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    for area in AREAS:
        area_where = f"{where}.areas.{area}"
        area_value = _mapping(areas_value[area], area_where, ("title", "rules"), ("title", "rules"))
        rules = area_value["rules"]
        if not isinstance(rules, list) or not rules:
            raise ConfigError(f"{area_where}.rules: expected a non-empty list of rules")
        areas[area] = (
            _text(area_value["title"], f"{area_where}.title"),
            tuple(_text(rule, f"{area_where}.rules[{index}]").strip() for index, rule in enumerate(rules)),
        )
    prompts = {}
    for role in ("expert", "worker"):
        role_value = _mapping(section[role], f"{where}.{role}", ("system", "user"), ("system", "user"))
        prompts[role] = (
            _template(role_value["system"], f"{where}.{role}.system", needs_document=False),
            _template(role_value["user"], f"{where}.{role}.user", needs_document=True),
        )
    return LanguageGuidelines(
        code=code,
        name=_text(section["name"], f"{where}.name").strip(),
        script=script,
        areas=areas,
        expert_system=prompts["expert"][0],
        expert_user=prompts["expert"][1],
        worker_system=prompts["worker"][0],
        worker_user=prompts["worker"][1],
    )


def parse_guidelines(data: object, source: str) -> Guidelines:
    """Guidelines from parsed YAML; ConfigError naming `source` and the field (languages.ar.expert.user)."""
    top = _mapping(data, source, ("version", "languages"), ("version", "languages"))
    version = _text(top["version"], f"{source}: version").strip()
    languages_value = top["languages"]
    if not isinstance(languages_value, dict) or not languages_value:
        raise ConfigError(f"{source}: languages: expected a mapping of language codes (ar, en, ...) to sections")
    languages = {}
    for code, section in languages_value.items():
        if not isinstance(code, str) or not code.strip():
            raise ConfigError(f"{source}: languages: language code {code!r} must be a non-empty string")
        languages[code] = _language(code, section, f"{source}: languages.{code}")
    return Guidelines(version=version, languages=languages, source=source)


def load_guidelines(path: Optional[str] = None) -> Guidelines:
    """Read and check a guidelines YAML file (default: the packaged polishing_v1.yaml).

    Raises ConfigError naming the file and the field for an unreadable file, invalid YAML, a missing or
    unknown field, an unknown script, or a template with a missing {document} or unknown placeholder.
    """
    if path is None:
        resource = importlib.resources.files("megalign.align") / "guidelines" / _PACKAGED
        source, text = f"megalign/align/guidelines/{_PACKAGED}", resource.read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ConfigError(f"{source}: cannot read guidelines ({error.strerror})") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    return parse_guidelines(data, source)
