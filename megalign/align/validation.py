"""Validation of one rewrite (expert or worker) before it is accepted, and knowledge-preservation shares.

``validate_rewrite`` applies these checks in order and stops at the first that fails; its reason is a
short stable string that the rewrite stage records on the record and counts in its summary:

=================  ==========================================================================================
``empty``          the rewrite is empty or whitespace
``truncated``      the server said finish_reason == "length", or (``check_mid_sentence``) the original ends
                   with sentence-final punctuation and the rewrite does not: the generation was cut off.
                   An original that itself ends mid-sentence (a headline, a list) is never judged this way.
``wrong_script``   the share of letters in the language's script is below ``min_script_share`` AND more
                   than ``script_share_slack`` below the original's share (so code-mixed originals may stay
                   code-mixed, but an Arabic document answered in English fails)
``length_ratio``   len(rewrite) / len(original without its URLs, e-mails and phone numbers) is outside
                   [min_length_ratio, max_length_ratio]; the upper bound is at least
                   ``length_slack_chars`` above the original length, so short documents may grow a little
``meta_text``      the rewrite talks about itself ("Here is the rewritten text:", "إليك النص المعاد صياغته")
                   and the original did not contain that phrase
``refusal``        the rewrite declines ("I can't help with that", "لا أستطيع المساعدة"), and the original
                   did not contain that phrase
``lost_numbers``   more than ``max_lost_number_share`` of the original's distinct numbers (digit systems
                   unified; numbers inside URLs, e-mails and phone numbers ignored, as the guidelines remove
                   those) are missing from the rewrite, and at least ``min_lost_numbers`` of them
``lost_entities``  likewise for named-entity candidates (text_signals.extract_entities, approximate)
=================  ==========================================================================================

Meta-text and refusal patterns of every configured lexicon are checked whatever the document language,
since a worker may answer an Arabic document with an English preamble.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megalign.align import text_signals as ts
from megalign.errors import ConfigError

__all__ = [
    "DEFAULT_LANGUAGE_SCRIPTS",
    "POLICIES",
    "REASONS",
    "ValidationConfig",
    "ValidationResult",
    "knowledge_preservation",
    "validate_rewrite",
]

#: Failure reasons, in the order the checks run.
REASONS = (
    "empty",
    "truncated",
    "wrong_script",
    "length_ratio",
    "meta_text",
    "refusal",
    "lost_numbers",
    "lost_entities",
)
#: What the rewrite stage does with a record whose rewrite failed: keep the original text or drop the record.
POLICIES = ("keep_original", "drop")
#: Scripts of common languages, used when ValidationConfig.scripts does not name the language.
DEFAULT_LANGUAGE_SCRIPTS = ts.DEFAULT_LANGUAGE_SCRIPTS


@dataclass
class ValidationConfig:
    """Thresholds of validate_rewrite (defaults suit polishing, which removes ads, URLs and boilerplate)."""

    #: Shortest accepted rewrite, as a share of the original's length without contact details.
    min_length_ratio: float = 0.3
    #: Longest accepted rewrite, as a multiple of that length (polishing should not add content).
    max_length_ratio: float = 1.6
    #: The longest accepted rewrite is at least this many characters longer than the original.
    length_slack_chars: int = 40
    #: A rewrite with less than this share of its letters in the language's script may be wrong_script ...
    min_script_share: float = 0.6
    #: ... when its share is also this much below the original's.
    script_share_slack: float = 0.2
    #: Reject when more than this share of the original's distinct numbers is missing ...
    max_lost_number_share: float = 0.25
    #: ... and at least this many are missing.
    min_lost_numbers: int = 2
    #: Reject when more than this share of the original's entity candidates is missing ...
    max_lost_entity_share: float = 0.34
    #: ... and at least this many are missing.
    min_lost_entities: int = 2
    #: Whether a rewrite ending mid-sentence (when the original did not) counts as truncated.
    check_mid_sentence: bool = True
    #: What the rewrite stage does when validation fails: "keep_original" or "drop".
    policy: str = "keep_original"
    #: Language code -> script name; languages not named here use DEFAULT_LANGUAGE_SCRIPTS (Guidelines.scripts fits).
    scripts: Dict[str, str] = field(default_factory=dict)
    #: Directory of user lexicons (LANG.yaml) that take precedence over the packaged ones.
    lexicon_dir: Optional[str] = None
    #: Languages whose meta-text and refusal patterns are checked in every rewrite (None: all packaged ones).
    pattern_languages: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"validation policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if not 0 <= self.min_length_ratio < self.max_length_ratio:
            raise ConfigError(
                f"validation: need 0 <= min_length_ratio ({self.min_length_ratio}) < "
                f"max_length_ratio ({self.max_length_ratio})"
            )
        for name in ("min_script_share", "script_share_slack", "max_lost_number_share", "max_lost_entity_share"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"validation: {name} = {value} must be between 0 and 1")
        for name in ("length_slack_chars", "min_lost_numbers", "min_lost_entities"):
            if getattr(self, name) < 0:
                raise ConfigError(f"validation: {name} = {getattr(self, name)} must be >= 0")
        for code, script in self.scripts.items():
            if script not in ts.SCRIPTS:
                raise ConfigError(
                    f"validation: script {script!r} of language {code!r} is not one of {', '.join(ts.SCRIPTS)}"
                )

    def script_for(self, language: str) -> str:
        """The script `language` is written in; ConfigError when neither `scripts` nor the defaults know it."""
        script = self.scripts.get(language) or DEFAULT_LANGUAGE_SCRIPTS.get(language)
        if script is None:
            raise ConfigError(
                f"validation: no script known for language {language!r}; pass "
                f"ValidationConfig(scripts={{{language!r}: 'latin'}}) or use Guidelines.scripts"
            )
        return script

    def lexicon(self, language: str) -> ts.Lexicon:
        """The lexicon of `language` (user directory first, then packaged, else empty)."""
        return ts.load_lexicon(language, self.lexicon_dir)

    def patterns(self, language: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(meta-text patterns, refusal patterns) of `language` and of every pattern language."""
        codes = list(self.pattern_languages if self.pattern_languages is not None else ts.packaged_lexicon_languages())
        meta: List[str] = []
        refusal: List[str] = []
        for code in dict.fromkeys([language] + codes):
            lexicon = self.lexicon(code)
            meta += lexicon.meta_text
            refusal += lexicon.refusal
        return tuple(meta), tuple(refusal)


@dataclass(frozen=True)
class ValidationResult:
    """ok, the reason of the first failed check (None when ok), and the measurements taken so far."""

    ok: bool
    reason: Optional[str]
    details: Dict[str, Any]


def _lost(kept: Sequence[str], original: Sequence[str]) -> List[str]:
    present = set(kept)
    return [item for item in dict.fromkeys(original) if item not in present]


def _numbers(original: str, rewritten: str) -> Tuple[List[str], List[str]]:
    """(distinct numbers of the original outside contact details, those missing from the rewrite)."""
    numbers = list(dict.fromkeys(ts.extract_numbers(ts.mask_contacts(original))))
    return numbers, _lost(ts.extract_numbers(rewritten), numbers)


def _entities(original: str, rewritten: str, lexicon: Optional[ts.Lexicon]) -> Tuple[List[str], List[str]]:
    """(entity candidates of the original outside contact details, those missing from the rewrite)."""
    entities = ts.extract_entities(ts.mask_contacts(original, "\n"), lexicon)
    normalized = ts.normalize_for_match(rewritten)
    return entities, [entity for entity in entities if not ts.entity_kept(entity, normalized)]


def knowledge_preservation(original: str, rewritten: str, lexicon: Optional[ts.Lexicon] = None) -> Dict[str, Any]:
    """Shares of the original's numbers and entity candidates kept in the rewrite, for the quality report.

    Returns {"numbers": n, "numbers_kept": k, "number_share": k/n (None when n == 0), "entities",
    "entities_kept", "entity_share"}.
    Pass the language's lexicon (text_signals.load_lexicon) for Arabic entity cues.
    """
    numbers, lost_numbers = _numbers(original, rewritten)
    entities, lost_entities = _entities(original, rewritten, lexicon)
    result: Dict[str, Any] = {}
    for name, share_name, items, lost in (
        ("numbers", "number_share", numbers, lost_numbers),
        ("entities", "entity_share", entities, lost_entities),
    ):
        kept = len(items) - len(lost)
        result[name] = len(items)
        result[f"{name}_kept"] = kept
        result[share_name] = kept / len(items) if items else None
    return result


def _fail(reason: str, details: Dict[str, Any]) -> ValidationResult:
    return ValidationResult(False, reason, details)


def _new_match(found: Optional[str], original: str, patterns: Tuple[str, ...], finder: Any) -> Optional[str]:
    """`found` unless the original has it too: the same match where the finder looks, or the matched
    phrase (10+ characters, so not a bare "sure,") anywhere, as in a text that quotes a chatbot."""
    if found is None or finder(original, patterns) == found:
        return None
    if len(found) >= 10 and found in ts.normalize_for_match(original):
        return None
    return found


def validate_rewrite(
    original: str,
    rewritten: Optional[str],
    language: str,
    config: Optional[ValidationConfig] = None,
    finish_reason: Optional[str] = None,
) -> ValidationResult:
    """Check one rewrite of `original` in `language` (see the module docstring for the checks and reasons)."""
    config = config or ValidationConfig()
    details: Dict[str, Any] = {}
    text = (rewritten or "").strip()
    if not text:
        return _fail("empty", details)

    details["finish_reason"] = finish_reason
    if finish_reason == "length":
        return _fail("truncated", details)
    if config.check_mid_sentence and ts.ends_sentence(original) and not ts.ends_sentence(text):
        details["ending"] = text[-40:]
        return _fail("truncated", details)

    script = config.script_for(language)
    share = ts.script_share(text, script)
    original_share = ts.script_share(original, script)
    details.update(script=script, script_share=share, original_script_share=original_share)
    if (
        share is not None
        and share < config.min_script_share
        and (original_share is None or share < original_share - config.script_share_slack)
    ):
        return _fail("wrong_script", details)

    base = len(ts.mask_contacts(original, "").strip()) or len(original.strip())
    ratio = len(text) / max(base, 1)
    upper = max(config.max_length_ratio, (base + config.length_slack_chars) / max(base, 1))
    details.update(length_ratio=round(ratio, 4), original_chars=base, rewritten_chars=len(text))
    if not config.min_length_ratio <= ratio <= upper:
        return _fail("length_ratio", details)

    meta_patterns, refusal_patterns = config.patterns(language)
    meta = _new_match(ts.find_meta_text(text, meta_patterns), original, meta_patterns, ts.find_meta_text)
    if meta is not None:
        details["meta_text"] = meta
        return _fail("meta_text", details)
    refusal = _new_match(ts.find_refusal(text, refusal_patterns), original, refusal_patterns, ts.find_refusal)
    if refusal is not None:
        details["refusal"] = refusal
        return _fail("refusal", details)

    numbers, lost_numbers = _numbers(original, text)
    details.update(numbers=len(numbers), lost_numbers=lost_numbers)
    if (
        numbers
        and len(lost_numbers) >= max(config.min_lost_numbers, 1)
        and len(lost_numbers) / len(numbers) > config.max_lost_number_share
    ):
        return _fail("lost_numbers", details)

    entities, lost_entities = _entities(original, text, config.lexicon(language))
    details.update(entities=len(entities), lost_entities=lost_entities)
    if (
        entities
        and len(lost_entities) >= max(config.min_lost_entities, 1)
        and len(lost_entities) / len(entities) > config.max_lost_entity_share
    ):
        return _fail("lost_entities", details)
    return ValidationResult(True, None, details)
