"""A deterministic rule-based stand-in for the alignment expert, served over the OpenAI API on loopback.

It lets the whole pipeline (annotate -> build-sft -> worker training -> rewrite -> report) run without
an LLM API or network, e.g. in `make demo` and in tests. It is not an aligner. It applies the
mechanical parts of the guidelines:

- URLs, e-mail addresses and phone numbers are removed;
- the lexicon's ad, spam and boilerplate phrases are removed;
- whitespace is tidied;
- everything else is kept word for word.

It finds the document in the last user message by matching the guideline's expert or worker user
template, so it answers both the annotate and the rewrite prompts.

    with RuleBasedExpertServer() as server:   # server.base_url -> http://127.0.0.1:PORT/v1
        run_annotate(..., ClientConfig(base_urls=[server.base_url], model=server.model_name, ...))
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megalign.align import text_signals as ts
from megalign.align.guidelines import Guidelines, load_guidelines
from megalign.inference.generation import Completion, GenerationParams
from megalign.inference.server import ModelServer

__all__ = ["RuleBasedExpert", "RuleBasedExpertServer", "polish"]

_SENTINEL = "\u0000DOCUMENT\u0000"
_BLANKS = re.compile(r"[ \t]+")
_EMPTY_LINES = re.compile(r"\n\s*\n\s*")


def polish(text: str, spam_phrases: Sequence[str] = ()) -> str:
    """``text`` without contact details and ``spam_phrases`` (case-insensitive), whitespace tidied."""
    text = ts.mask_contacts(text)
    for phrase in spam_phrases:
        text = re.sub(rf"(?i)(?<!\w){re.escape(phrase)}(?!\w)", " ", text)
    text = _BLANKS.sub(" ", text)
    text = re.sub(r" +([.,;:!?،؛؟])", r"\1", text)
    text = re.sub(r"([.,;:!?،؛؟])(?:\s*\1)+", r"\1", text)  # ". ." left where a phrase was removed
    lines = [line.strip() for line in _EMPTY_LINES.sub("\n\n", text).split("\n")]
    return "\n".join(lines).strip()


class RuleBasedExpert:
    """Answers chat requests built from ``guidelines``' expert or worker templates with :func:`polish`."""

    def __init__(self, guidelines: Optional[Guidelines] = None, lexicon_dir: Optional[str] = None) -> None:
        self.guidelines = guidelines or load_guidelines()
        self.spam = {code: ts.load_lexicon(code, lexicon_dir).spam for code in self.guidelines.languages}
        self.templates: List[Tuple[str, str, str]] = []  # (language, prefix, suffix) of each user template
        for code in self.guidelines.languages:
            for messages in (
                self.guidelines.expert_messages(_SENTINEL, code),
                self.guidelines.worker_messages(_SENTINEL, code),
            ):
                prefix, _, suffix = messages[-1]["content"].partition(_SENTINEL)
                self.templates.append((code, prefix, suffix))
        self.templates.sort(key=lambda item: -len(item[1]) - len(item[2]))  # most specific first

    def document_of(self, message: str) -> Tuple[str, str]:
        """(language, document) of a user message made from a guideline template (else the whole message)."""
        for code, prefix, suffix in self.templates:
            if message.startswith(prefix) and message.endswith(suffix) and len(message) >= len(prefix) + len(suffix):
                return code, message[len(prefix) : len(message) - len(suffix)]
        return self.guidelines.detect_language(message), message

    def reply(self, messages: Sequence[Dict[str, str]]) -> str:
        user = [m["content"] for m in messages if m.get("role") == "user"]
        language, document = self.document_of(user[-1] if user else "")
        return polish(document, self.spam.get(language, ()))

    @staticmethod
    def _completion(prompt: str, text: str) -> Completion:
        return Completion(
            text=text,
            token_ids=[],
            finish_reason="stop",
            prompt_tokens=len(ts.words(prompt)),
            completion_tokens=len(ts.words(text)),
        )

    def chat(self, conversations: Sequence[List[Dict[str, str]]], params: GenerationParams) -> List[Completion]:
        """The server's chat entry point (``params`` are ignored: the rules are deterministic)."""
        return [self._completion(" ".join(m["content"] for m in c), self.reply(c)) for c in conversations]

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> List[Completion]:
        """The server's completions entry point: each prompt polished as a document."""
        return [self._completion(p, self.reply([{"role": "user", "content": p}])) for p in prompts]

    def close(self) -> None:
        """Nothing to release (no model, no threads)."""


class RuleBasedExpertServer(ModelServer):
    """:class:`RuleBasedExpert` behind the OpenAI-compatible server (127.0.0.1, a free port by default)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "rule-based-expert",
        guidelines: Optional[Guidelines] = None,
        **options: Any,
    ) -> None:
        super().__init__(RuleBasedExpert(guidelines, **options), model_name, host, port)
