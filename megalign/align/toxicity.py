"""Toxicity scores of documents, to compare original and aligned corpora (the paper reports lower
toxicity after rewriting).

The default scorer is model-free: a per-language lexicon (megalign/align/lexicons/LANG.yaml, field
``toxicity``) lists terms in five categories:

* ``hate``        dehumanising or group-directed hostility (slurs, "inferior race", calls to expel a group)
* ``harassment``  insults and threats aimed at a person ("idiot", "kill yourself", "يا حمار")
* ``sexual``      explicit sexual and pornographic content
* ``violence``    calls for or graphic descriptions of violence ("slaughter", "اقتلوهم", "مجزرة")
* ``profanity``   swearing and vulgar words

Terms match whole words of normalize_for_match(text) (case-folded; Arabic diacritics, tatweel and
letter variants folded); a lexicon ``prefixes`` list (Arabic: ال و ب ف ك ل and their combinations) lets
a word also match once one prefix is removed; a term "word*" matches any word that starts with "word";
a multi-word term matches consecutive words. A document's score per category is the number of matches
per 1000 words; it is ``flagged`` when any category reaches ``flag_per_1000`` (and at least
``min_matches`` terms matched in all).

Any classifier plugs in instead: ``ClassifierScorer(fn)`` wraps a callable text -> {category: score in
[0, 1]} and flags a document when a score reaches its threshold. Both satisfy the ToxicityScorer protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

from megalign.align import text_signals as ts
from megalign.errors import ConfigError

__all__ = [
    "CATEGORIES",
    "ClassifierScorer",
    "LexiconToxicityScorer",
    "ToxicityScore",
    "ToxicityScorer",
    "aggregate_scores",
]

#: The categories of the packaged lexicons (a user lexicon may define others).
CATEGORIES = ("hate", "harassment", "sexual", "violence", "profanity")


@dataclass(frozen=True)
class ToxicityScore:
    """One document's scores per category, whether it is flagged, and (lexicon scorer) the evidence."""

    scores: Dict[str, float]
    flagged: bool
    words: int = 0
    matches: Dict[str, List[str]] = field(default_factory=dict)


class ToxicityScorer(Protocol):
    """Anything that scores one document; `language` may be None (the scorer decides)."""

    def score(self, text: str, language: Optional[str] = None) -> ToxicityScore: ...


@dataclass(frozen=True)
class _CompiledLexicon:
    lexicon: ts.Lexicon
    words: Dict[str, Tuple[str, ...]]  # word -> categories
    stems: Tuple[Tuple[str, str], ...]  # (stem, category)
    phrases: Dict[str, Tuple[Tuple[Tuple[str, ...], str], ...]]  # first word -> ((words...), category)


def _compile(lexicon: ts.Lexicon) -> _CompiledLexicon:
    single: Dict[str, List[str]] = {}
    stems: List[Tuple[str, str]] = []
    phrases: Dict[str, List[Tuple[Tuple[str, ...], str]]] = {}
    for category, terms in lexicon.toxicity.items():
        for term in terms:
            parts = ts.words(term.rstrip("*"))
            if not parts:
                continue
            if len(parts) > 1:
                phrases.setdefault(parts[0], []).append((tuple(parts), category))
            elif term.endswith("*"):
                stems.append((parts[0], category))
            else:
                single.setdefault(parts[0], []).append(category)
    return _CompiledLexicon(
        lexicon,
        {word: tuple(dict.fromkeys(cats)) for word, cats in single.items()},
        tuple(stems),
        {word: tuple(items) for word, items in phrases.items()},
    )


class LexiconToxicityScorer:
    """The default scorer: lexicon matches per 1000 words per category (see the module docstring).

    languages: lexicons to load (default: every packaged one); a document is scored with the lexicon of
    the `language` passed to score(), else of its detected language (by script; a Latin document uses
    the first Latin-script language). lexicon_dir: a directory of user LANG.yaml lexicons that take
    precedence over the packaged ones. scripts: language -> script for detection (default: common ones).
    """

    def __init__(
        self,
        languages: Optional[Sequence[str]] = None,
        lexicon_dir: Optional[str] = None,
        flag_per_1000: float = 5.0,
        min_matches: int = 1,
        scripts: Optional[Mapping[str, str]] = None,
        lexicons: Optional[Sequence[ts.Lexicon]] = None,
    ) -> None:
        if flag_per_1000 <= 0 or min_matches < 1:
            raise ConfigError(
                f"toxicity: flag_per_1000 ({flag_per_1000}) must be > 0 and min_matches ({min_matches}) >= 1"
            )
        if lexicons is None:
            codes = list(languages) if languages is not None else ts.packaged_lexicon_languages()
            lexicons = [ts.load_lexicon(code, lexicon_dir) for code in codes]
        if not lexicons:
            raise ConfigError("toxicity: no lexicon languages given")
        self.flag_per_1000 = flag_per_1000
        self.min_matches = min_matches
        self._lexicons = {lexicon.language: _compile(lexicon) for lexicon in lexicons}
        known = dict(ts.DEFAULT_LANGUAGE_SCRIPTS, **(scripts or {}))
        self._scripts = {code: known[code] for code in self._lexicons if code in known}
        categories = [category for lexicon in lexicons for category in lexicon.toxicity]
        self.categories: Tuple[str, ...] = tuple(dict.fromkeys(list(CATEGORIES) + categories))

    @classmethod
    def from_files(cls, paths: Sequence[str], **options: object) -> "LexiconToxicityScorer":
        """A scorer using user lexicon files (each file's `language` field names its language)."""
        return cls(lexicons=[ts.load_lexicon_file(path) for path in paths], **options)  # type: ignore[arg-type]

    def _lexicon_for(self, text: str, language: Optional[str]) -> _CompiledLexicon:
        if language is None:
            language = ts.detect_language(text, self._scripts) if self._scripts else next(iter(self._lexicons))
        compiled = self._lexicons.get(language)
        if compiled is None:
            raise ConfigError(
                f"toxicity: no lexicon loaded for language {language!r} (loaded: {', '.join(self._lexicons)})"
            )
        return compiled

    def find_matches(self, text: str, language: Optional[str] = None) -> Dict[str, List[str]]:
        """The matched terms of `text` per category (with repeats)."""
        compiled = self._lexicon_for(text, language)
        tokens = ts.words(text)
        forms = [compiled.lexicon.strip_prefixes(token) for token in tokens]
        matches: Dict[str, List[str]] = {}
        index = 0
        while index < len(tokens):
            step = 1
            for form in forms[index]:
                for parts, category in compiled.phrases.get(form, ()):
                    end = index + len(parts)
                    if end <= len(tokens) and all(
                        part in forms[i] for part, i in zip(parts[1:], range(index + 1, end))
                    ):
                        matches.setdefault(category, []).append(" ".join(parts))
                        step = max(step, len(parts))
            if step == 1:
                for form in forms[index]:
                    categories = compiled.words.get(form, ())
                    for category in categories:
                        matches.setdefault(category, []).append(form)
                    if categories:
                        break
                else:
                    for stem, category in compiled.stems:
                        if any(form.startswith(stem) for form in forms[index]):
                            matches.setdefault(category, []).append(tokens[index])
            index += step
        return matches

    def score(self, text: str, language: Optional[str] = None) -> ToxicityScore:
        """Matches per 1000 words in each category, and whether the document is flagged."""
        matches = self.find_matches(text, language)
        count = len(ts.words(text))
        scale = 1000.0 / count if count else 0.0
        scores = {category: len(matches.get(category, ())) * scale for category in self.categories}
        total = sum(len(found) for found in matches.values())
        flagged = total >= self.min_matches and any(value >= self.flag_per_1000 for value in scores.values())
        return ToxicityScore(scores=scores, flagged=flagged, words=count, matches=matches)


class ClassifierScorer:
    """Wraps any classifier `fn(text) -> {category: score}` (scores in [0, 1]) as a ToxicityScorer.

    A document is flagged when some category's score reaches `thresholds[category]` (default `threshold`).
    """

    def __init__(
        self,
        fn: Callable[[str], Mapping[str, float]],
        threshold: float = 0.5,
        thresholds: Optional[Mapping[str, float]] = None,
    ) -> None:
        if not callable(fn):
            raise ConfigError("toxicity: ClassifierScorer needs a callable text -> {category: score}")
        self.fn = fn
        self.threshold = threshold
        self.thresholds = dict(thresholds or {})

    def score(self, text: str, language: Optional[str] = None) -> ToxicityScore:
        raw = self.fn(text)
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"toxicity classifier returned {type(raw).__name__}, expected a mapping category -> score"
            )
        scores = {str(category): float(value) for category, value in raw.items()}
        flagged = any(value >= self.thresholds.get(category, self.threshold) for category, value in scores.items())
        return ToxicityScore(scores=scores, flagged=flagged, words=len(ts.words(text)))


def aggregate_scores(scores: Iterable[ToxicityScore]) -> Dict[str, object]:
    """Corpus summary for the quality report: documents, flagged count and share, mean score per category,
    and the share of documents with any match per category."""
    documents = flagged = 0
    sums: Dict[str, float] = {}
    hits: Dict[str, int] = {}
    for score in scores:
        documents += 1
        flagged += int(score.flagged)
        for category, value in score.scores.items():
            sums[category] = sums.get(category, 0.0) + value
            hits[category] = hits.get(category, 0) + int(value > 0)
    return {
        "documents": documents,
        "flagged": flagged,
        "flagged_share": flagged / documents if documents else 0.0,
        "mean_per_1000_words": {category: total / documents for category, total in sums.items()} if documents else {},
        "share_with_matches": {category: count / documents for category, count in hits.items()} if documents else {},
    }
