"""Small, model-free text measurements shared by the alignment stages (validation, toxicity, report, dedup).

Everything here is a pure function of its arguments, so it is cheap to test and safe to call from
many worker processes. Language-specific word lists (spam markers, meta-text and refusal patterns,
entity cues, toxicity terms) are not hard-coded: they live in one YAML lexicon per language
(``megalign/align/lexicons/LANG.yaml``, or a user directory) and are read with :func:`load_lexicon`.

* scripts: :func:`script_shares` (share of letters per writing system), :func:`detect_language`;
* normalisation: :func:`normalize_digits`, :func:`normalize_arabic`, :func:`normalize_for_match`
  (also the key normalisation dedup can use);
* contact details: :func:`find_urls`, :func:`find_emails`, :func:`find_phone_numbers`,
  :func:`find_contacts`, :func:`mask_contacts`;
* facts: :func:`extract_numbers` (digit systems and separators unified), :func:`extract_entities`
  (an approximate heuristic, documented there);
* reply hygiene: :func:`find_spam_markers`, :func:`find_meta_text`, :func:`find_refusal`,
  :func:`ends_sentence`.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Pattern, Sequence, Tuple

import yaml

from megalign.errors import ConfigError
from megalign.utils.yaml_files import read_yaml_file

# ---- scripts ---------------------------------------------------------------------------------------------
#: Letter ranges of the writing systems a language section may name as its `script`.
SCRIPT_RANGES: Dict[str, Tuple[Tuple[int, int], ...]] = {
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "latin": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF)),
    "cyrillic": ((0x0400, 0x052F),),
    "greek": ((0x0370, 0x03FF),),
    "hebrew": ((0x0590, 0x05FF),),
    "devanagari": ((0x0900, 0x097F),),
    "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF)),
}
SCRIPTS = tuple(SCRIPT_RANGES)
#: Scripts of common languages (ISO 639-1 codes), for callers that are given a language but no script.
DEFAULT_LANGUAGE_SCRIPTS = {
    "ar": "arabic",
    "fa": "arabic",
    "ur": "arabic",
    "en": "latin",
    "fr": "latin",
    "de": "latin",
    "es": "latin",
    "it": "latin",
    "pt": "latin",
    "nl": "latin",
    "tr": "latin",
    "id": "latin",
    "ms": "latin",
    "ru": "cyrillic",
    "uk": "cyrillic",
    "el": "greek",
    "he": "hebrew",
    "hi": "devanagari",
    "zh": "cjk",
    "ja": "cjk",
    "ko": "cjk",
}


_LETTERS = re.compile(r"[^\W\d_]+")
_SCRIPT_CLASSES = {
    name: re.compile("[" + "".join(f"\\U{low:08x}-\\U{high:08x}" for low, high in ranges) + "]")
    for name, ranges in SCRIPT_RANGES.items()
}


def script_shares(text: str) -> Dict[str, float]:
    """Share of the letters of `text` in each script (keys of SCRIPT_RANGES plus "other"); {} without letters.

    Only letters count: digits, punctuation, spaces and Arabic diacritics (combining marks) are ignored.
    """
    letters = "".join(_LETTERS.findall(text))
    if not letters:
        return {}
    shares: Dict[str, float] = {}
    rest = len(letters)
    for name, pattern in _SCRIPT_CLASSES.items():
        count = len(pattern.findall(letters))
        if count:
            shares[name] = count / len(letters)
            rest -= count
    if rest:
        shares["other"] = rest / len(letters)
    return shares


def script_share(text: str, script: str) -> Optional[float]:
    """Share of the letters of `text` written in `script`, or None when `text` has no letters."""
    if script not in SCRIPT_RANGES:
        raise ConfigError(f"unknown script {script!r}; known scripts: {', '.join(SCRIPTS)}")
    shares = script_shares(text)
    return shares.get(script, 0.0) if shares else None


def detect_language(text: str, languages: Mapping[str, str], default: Optional[str] = None) -> str:
    """The language code whose script has the largest letter share in `text`.

    `languages` maps language codes to script names, in order of preference: of several languages
    sharing the winning script (en and fr are both Latin), the first one wins. A text without
    letters, or whose main script no language uses, gets `default` (the first language when None).
    """
    if not languages:
        raise ConfigError("detect_language needs at least one language")
    shares = script_shares(text)
    best: Optional[str] = None
    best_share = 0.0
    for code, script in languages.items():
        share = shares.get(script, 0.0)
        if share > best_share:
            best, best_share = code, share
    return best or default or next(iter(languages))


# ---- normalisation ---------------------------------------------------------------------------------------
_ARABIC_DIACRITICS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e8\u06ea-\u06ed]")
_TATWEEL = "\u0640"
# (variant, replacement); applied with str.replace, which is ~30x faster than str.translate on long text
_ARABIC_LETTER_MAP = (
    ("\u0623", "\u0627"),
    ("\u0625", "\u0627"),
    ("\u0622", "\u0627"),
    ("\u0671", "\u0627"),  # أ إ آ ٱ -> ا
    ("\u0649", "\u064a"),
    ("\u06cc", "\u064a"),  # ى ی -> ي
    ("\u0629", "\u0647"),  # ة -> ه
    ("\u06a9", "\u0643"),  # Persian keheh ک -> ك
)
_NON_ASCII_DIGIT = re.compile(r"(?![0-9])\d")
_SPACES = re.compile(r"\s+")


def normalize_digits(text: str) -> str:
    """Every decimal digit (Arabic-Indic ٠-٩, Persian ۰-۹, any Unicode Nd) as its ASCII digit."""
    if text.isascii():
        return text

    def ascii_digit(match: "re.Match[str]") -> str:
        char = match.group()
        value = unicodedata.decimal(char, None)
        return char if value is None else str(value)

    return _NON_ASCII_DIGIT.sub(ascii_digit, text)


def normalize_arabic(text: str, diacritics: bool = True, tatweel: bool = True, letters: bool = True) -> str:
    """Arabic orthographic variants folded: diacritics and Quranic marks removed, tatweel removed,
    alef variants (أ إ آ ٱ) -> ا, alef maqsura and Persian ya (ى ی) -> ي, ta marbuta (ة) -> ه, keheh -> ك.

    Lossy on purpose: for matching and keys, never for text that is written out.
    """
    if diacritics:
        text = _ARABIC_DIACRITICS.sub("", text)
    if tatweel:
        text = text.replace(_TATWEEL, "")
    if letters:
        for variant, replacement in _ARABIC_LETTER_MAP:
            if variant in text:
                text = text.replace(variant, replacement)
    return text


def normalize_for_match(text: str) -> str:
    """The comparison form of `text`: NFKC, case-folded, Arabic folded (normalize_arabic), digits ASCII,
    whitespace runs as one space, stripped. Dedup keys, lexicon matching and entity checks all use it."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = normalize_digits(normalize_arabic(text))
    return _SPACES.sub(" ", text).strip()


_WORD = re.compile(r"\w+")


def words(text: str) -> List[str]:
    """The word tokens of normalize_for_match(text) (runs of letters, digits and underscores)."""
    return _WORD.findall(normalize_for_match(text))


# ---- contact details -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """A found piece of text: what it is ("url", "email", "phone"), where it is, and its text."""

    kind: str
    start: int
    end: int
    text: str


_TLDS = (
    "com|org|net|edu|gov|info|biz|io|co|me|ly|tv|ai|app|sa|ae|eg|qa|kw|bh|om|jo|ma|dz|tn|lb|iq|sy|ps|"
    "sd|ye|uk|us|de|fr|es|it|nl|ru|tr|in|cn|jp"
)
_URL = re.compile(
    r"(?:(?:https?|ftp)://|www\.)[^\s<>\"'()\[\]{}،]+"
    rf"|(?<![\w@.-])[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*\.(?:{_TLDS})\b(?:/[^\s<>\"'()\[\]{{}}،]*)?",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A digit, then 6..16 more digits each after at most two separators; refined by _looks_like_phone.
_PHONE_CANDIDATE = re.compile(r"(?<![\w+])(?:\+|00)?\(?\d(?:[ \t.\-()]{0,2}\d){6,16}(?!\w)")
_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}(?!\d)|(?<!\d)\d{1,2}[-./]\d{1,2}[-./]\d{4}")
_TRAILING_URL_PUNCT = ".,;:!?'\"،؛؟"


def find_urls(text: str) -> List[Span]:
    """Web addresses: scheme or www. forms and bare domains with a common TLD (example.com/path)."""
    spans = []
    for match in _URL.finditer(text):
        found = match.group().rstrip(_TRAILING_URL_PUNCT)
        spans.append(Span("url", match.start(), match.start() + len(found), found))
    return spans


def find_emails(text: str) -> List[Span]:
    """E-mail addresses (ASCII local part and domain)."""
    return [Span("email", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]


def _looks_like_phone(candidate: str) -> bool:
    digits = normalize_digits(re.sub(r"\D", "", candidate))
    if not 7 <= len(digits) <= 15:
        return False
    ascii_form = normalize_digits(candidate)
    if _DATE_LIKE.search(ascii_form):
        return False
    international = ascii_form.startswith(("+", "00"))
    local = ascii_form.lstrip("(").startswith("0")
    separators = set(re.sub(r"\d", "", ascii_form.lstrip("+")))
    if not separators:  # a plain digit run is a phone number only with a trunk or international prefix
        return international or local
    if separators == {"."} and ascii_form.count(".") == 1:
        return False  # a decimal number
    if separators <= {" ", "\t"}:  # space-separated groups could be a list of numbers or years
        return international or local
    return True


def _phone_within(candidate: str) -> Optional[Tuple[int, int]]:
    """(start, end) of the longest phone number inside a rejected candidate, starting and ending at
    group boundaries ("1958 0598737458" holds one), or None."""
    starts = [0] + [m.end() for m in re.finditer(r"\s+", candidate)]
    ends = [m.start() for m in re.finditer(r"\s+", candidate)] + [len(candidate)]
    best: Optional[Tuple[int, int]] = None
    for start in starts:
        for end in ends:
            if end > start and (best is None or end - start > best[1] - best[0]):
                if _looks_like_phone(candidate[start:end]):
                    best = (start, end)
    return best


def find_phone_numbers(text: str) -> List[Span]:
    """Telephone numbers with 7-15 digits in any decimal digit system (ASCII, ٠-٩, ۰-۹).

    Accepted: +CC / 00CC international numbers, local numbers starting with 0, and numbers grouped with
    dashes, dots or parentheses. Rejected as not phones: dates (2015-08-08, 08/08/2015), decimals,
    and space-separated or plain digit runs without a 0 / + / 00 prefix (lists of numbers, amounts).
    """
    spans = []
    for match in _PHONE_CANDIDATE.finditer(text):
        found = match.group()
        start = match.start()
        if found.startswith("(") and ")" not in found:
            found, start = found[1:], start + 1
        if _looks_like_phone(found):
            spans.append(Span("phone", start, start + len(found), found))
        elif len(found) < 80:
            inner = _phone_within(found)
            if inner is not None:
                spans.append(Span("phone", start + inner[0], start + inner[1], found[inner[0] : inner[1]]))
    return spans


def find_contacts(text: str) -> List[Span]:
    """E-mails, URLs and phone numbers in text order, without overlaps (e-mail > URL > phone)."""
    taken: List[Span] = []
    for finder in (find_emails, find_urls, find_phone_numbers):
        for span in finder(text):
            if all(span.end <= other.start or span.start >= other.end for other in taken):
                taken.append(span)
    return sorted(taken, key=lambda span: span.start)


def mask_contacts(text: str, replacement: str = " ") -> str:
    """`text` with every contact span (find_contacts) replaced by `replacement`."""
    pieces, done = [], 0
    for span in find_contacts(text):
        pieces += [text[done : span.start], replacement]
        done = span.end
    pieces.append(text[done:])
    return "".join(pieces)


# ---- numbers ---------------------------------------------------------------------------------------------
# Thousands groups (1,234,567 / ١٬٢٣٤ / 1 234 567 with a narrow no-break space) or a plain run, then an
# optional decimal part ("." or the Arabic decimal separator ٫).
_NUMBER = re.compile(r"\d{1,3}(?:[,\u066C\u202F\u00A0]\d{3})+(?:[.\u066B]\d+)?(?!\d)|\d+(?:[.\u066B]\d+)?")


def canonical_number(token: str) -> str:
    """One number as a comparable string: ASCII digits, no thousands separators, "." decimal point,
    no leading zeros in the integer part, no trailing zeros in the fraction ("٠٧" -> "7", "2,024.50" -> "2024.5")."""
    ascii_form = normalize_digits(token)
    for separator in (",", "\u066c", "\u202f", "\u00a0"):
        ascii_form = ascii_form.replace(separator, "")
    integer, _, fraction = ascii_form.replace("\u066b", ".").partition(".")
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{integer}.{fraction}" if fraction else integer


def extract_numbers(text: str) -> List[str]:
    """The numbers written with digits in `text`, in order, each as canonical_number() gives it.

    "٢٠٢٤" == "۲۰۲۴" == "2024"; "1,500,000" == "1500000". A comma not followed by exactly three digits
    separates two numbers ("1,5" is 1 and 5). Numbers written in words are not found.
    """
    return [canonical_number(match.group()) for match in _NUMBER.finditer(text)]


# ---- lexicons --------------------------------------------------------------------------------------------
_LEXICON_LISTS = ("prefixes", "spam", "meta_text", "refusal", "entity_cues", "entity_connectors", "stopwords")


@dataclass(frozen=True)
class Lexicon:
    """The word lists of one language (see lexicons/en.yaml for the documented layout).

    Terms are stored in normalize_for_match form; `meta_text` and `refusal` are regular expressions
    (normalize_pattern form) matched case-insensitively against normalize_for_match(text).
    """

    language: str
    source: str = "<empty>"
    prefixes: Tuple[Tuple[str, str], ...] = ()  # (prefix, what replaces it): ("لل", "ال") turns للدكتور into الدكتور
    toxicity: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    spam: Tuple[str, ...] = ()
    meta_text: Tuple[str, ...] = ()
    refusal: Tuple[str, ...] = ()
    entity_cues: Tuple[str, ...] = ()
    entity_connectors: Tuple[str, ...] = ()
    stopwords: Tuple[str, ...] = ()

    def strip_prefixes(self, token: str) -> List[str]:
        """`token` and every form of it with one listed prefix removed or replaced (longest prefix first),
        keeping at least two letters of the rest."""
        forms = [token]
        for prefix, replacement in self.prefixes:
            if token.startswith(prefix) and len(token) - len(prefix) >= 2:
                form = replacement + token[len(prefix) :]
                if form not in forms:
                    forms.append(form)
        return forms


def _string_list(value: object, where: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of strings, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            hint = (
                " (quote words YAML reads as booleans or numbers: 'on', 'no', '10')"
                if not isinstance(item, str)
                else ""
            )
            raise ConfigError(f"{where}[{index}]: expected a non-empty string, got {item!r}{hint}")
    return tuple(value)


def _check_patterns(patterns: Sequence[str], where: str) -> None:
    for index, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{where}[{index}]: invalid regular expression {pattern!r} ({error})") from None


def _prefix_rules(items: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
    """("PREFIX", "") for "PREFIX" and ("PREFIX", "REPLACEMENT") for "PREFIX>REPLACEMENT", longest first."""
    rules = []
    for item in items:
        prefix, _, replacement = item.partition(">")
        rules.append((normalize_for_match(prefix), normalize_for_match(replacement)))
    return tuple(sorted(rules, key=lambda rule: len(rule[0]), reverse=True))


def parse_lexicon(data: object, source: str, language: Optional[str] = None) -> Lexicon:
    """A Lexicon from parsed YAML; ConfigError naming `source` and the field when the layout is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping with 'language', 'toxicity', 'spam', ..., got {type(data).__name__}"
        )
    known = {"language", "toxicity", *_LEXICON_LISTS}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    code = data.get("language", language)
    if not isinstance(code, str) or not code:
        raise ConfigError(f"{source}: field 'language' must be a language code such as 'ar'")
    lists = {name: _string_list(data.get(name), f"{source}: field '{name}'") for name in _LEXICON_LISTS}
    for name in ("meta_text", "refusal"):
        _check_patterns(lists[name], f"{source}: field '{name}'")
    toxicity_data = data.get("toxicity") or {}
    if not isinstance(toxicity_data, dict):
        raise ConfigError(f"{source}: field 'toxicity' must map category names to lists of terms")
    toxicity = {
        str(category): _string_list(terms, f"{source}: field 'toxicity.{category}'")
        for category, terms in toxicity_data.items()
    }

    def norm(items: Iterable[str]) -> Tuple[str, ...]:
        return tuple(normalize_for_match(item) for item in items)

    return Lexicon(
        language=code,
        source=source,
        prefixes=_prefix_rules(lists["prefixes"]),
        toxicity={category: norm(terms) for category, terms in toxicity.items()},
        spam=norm(lists["spam"]),
        meta_text=tuple(map(normalize_pattern, lists["meta_text"])),
        refusal=tuple(map(normalize_pattern, lists["refusal"])),
        entity_cues=norm(lists["entity_cues"]),
        entity_connectors=norm(lists["entity_connectors"]),
        stopwords=norm(lists["stopwords"]),
    )


def load_lexicon_file(path: str, language: Optional[str] = None) -> Lexicon:
    """Read one lexicon YAML file; ConfigError naming the file when it is unreadable or malformed."""
    return parse_lexicon(read_yaml_file(path, what="lexicon"), path, language)


@functools.lru_cache(maxsize=None)
def _packaged_lexicon(language: str) -> Lexicon:
    resource = importlib.resources.files("megalign.align") / "lexicons" / f"{language}.yaml"
    if not resource.is_file():
        return Lexicon(language=language)
    data = yaml.safe_load(resource.read_text(encoding="utf-8"))
    return parse_lexicon(data, f"megalign/align/lexicons/{language}.yaml", language)


@functools.lru_cache(maxsize=64)
def _user_lexicon(path: str, mtime: float) -> Lexicon:
    return load_lexicon_file(path)


def load_lexicon(language: str, directory: Optional[str] = None) -> Lexicon:
    """The lexicon of `language`: DIRECTORY/LANGUAGE.yaml when it exists, else the packaged one, else an
    empty lexicon (every list-driven signal then finds nothing for that language). Results are cached."""
    if directory is not None:
        path = os.path.join(directory, f"{language}.yaml")
        if os.path.isfile(path):
            return _user_lexicon(path, os.path.getmtime(path))
    return _packaged_lexicon(language)


def packaged_lexicon_languages() -> List[str]:
    """Codes of the lexicons shipped with megalign (file names under megalign/align/lexicons/)."""
    return list(_packaged_languages())


@functools.lru_cache(maxsize=1)
def _packaged_languages() -> Tuple[str, ...]:
    folder = importlib.resources.files("megalign.align") / "lexicons"
    return tuple(sorted(item.name[:-5] for item in folder.iterdir() if item.name.endswith(".yaml")))


# ---- phrase lists: spam, meta text, refusals ---------------------------------------------------------------
def find_spam_markers(text: str, markers: Sequence[str]) -> List[str]:
    """The ad/spam/boilerplate markers (normalised phrases, e.g. Lexicon.spam) found in `text`, with repeats,
    matched on whole words of normalize_for_match(text)."""
    tokens = words(text)
    found = []
    for marker in markers:
        key = _WORD.findall(marker)
        if key:
            size = len(key)
            found += [marker] * sum(tokens[i : i + size] == key for i in range(len(tokens) - size + 1))
    return found


def normalize_pattern(pattern: str) -> str:
    """A regular expression folded like normalize_for_match folds text (NFKC, Arabic, digits) but not
    case-folded, so escapes such as \\S and \\W keep their meaning; patterns compile with IGNORECASE."""
    return normalize_digits(normalize_arabic(unicodedata.normalize("NFKC", pattern)))


@functools.lru_cache(maxsize=256)
def _compiled(patterns: Tuple[str, ...]) -> Tuple[Pattern[str], ...]:
    return tuple(re.compile(normalize_pattern(pattern), re.IGNORECASE) for pattern in patterns)


def _find_pattern(text: str, patterns: Sequence[str], head: int, tail: int) -> Optional[str]:
    normalized = normalize_for_match(text)
    for pattern in _compiled(tuple(patterns)):
        # Searching the whole string with pos/endpos keeps "^" meaning the real start of the text.
        match = pattern.search(normalized, 0, head)
        if match is None and tail:
            match = pattern.search(normalized, max(0, len(normalized) - tail))
        if match:
            return match.group()
    return None


def find_meta_text(text: str, patterns: Sequence[str], head: int = 200, tail: int = 200) -> Optional[str]:
    """The first meta-text match (a model talking about its answer: "here is the rewritten text",
    "إليك النص المعاد صياغته", "Sure, ...") in the first `head` or last `tail` normalised characters, or None."""
    return _find_pattern(text, patterns, head, tail)


def find_refusal(text: str, patterns: Sequence[str], head: int = 300) -> Optional[str]:
    """The first refusal match ("I can't help with that", "لا أستطيع المساعدة") in the first `head`
    normalised characters, or None."""
    return _find_pattern(text, patterns, head, 0)


_SENTENCE_END = ".!?…؟۔。"
_CLOSERS = "\"'»”’)]}>*_`"


def ends_sentence(text: str) -> bool:
    """Whether `text` ends with sentence-final punctuation (. ! ? … ؟ ۔), possibly followed by closing
    quotes or brackets, or is empty."""
    stripped = text.rstrip().rstrip(_CLOSERS).rstrip()
    return not stripped or stripped[-1] in _SENTENCE_END


# ---- named entities (approximate) --------------------------------------------------------------------------
_TOKEN = re.compile(r"[^\W\d_][\w'’\-]*|[.!?؟…\n]|[^\w\s]")
_SENTENCE_BREAK = set(".!?؟…\n")


def extract_entities(text: str, lexicon: Optional[Lexicon] = None) -> List[str]:
    """Named-entity candidates of `text`, distinct, in normalize_for_match form. Approximate, model-free:

    1. Capitalised runs (scripts with letter case): maximal runs of capitalised words, joined across
       the lexicon's `entity_connectors` ("of", "bin", "de"). At a sentence start the first word is
       dropped (it is capitalised anyway), so "The United Nations said" gives "united nations".
    2. Cue words (any script, Arabic in particular): the one or two words after a lexicon
       `entity_cues` word (titles and honorifics such as الشيخ، الدكتور، الرئيس; place and organisation
       heads such as مدينة، جامعة، شركة), also when the cue carries a listed prefix (والرئيس، للشيخ);
       a cue word may itself start the name (جامعة الملك سعود gives "الملك سعود").
       A connector (بن، أبو) extends the name by one more word; a stopword or punctuation ends it.

    It misses entities without cue or capital and finds some non-entities: good for a share of kept
    entities over many documents, not for tagging one.
    """
    lexicon = lexicon or Lexicon(language="")
    # Diacritics and tatweel go first: they are not word characters and would split Arabic words.
    tokens = _TOKEN.findall(normalize_arabic(unicodedata.normalize("NFKC", text), letters=False))
    norms = [_fold_token(token) if token[0].isalpha() else "" for token in tokens]
    connectors = set(lexicon.entity_connectors)
    cues = set(lexicon.entity_cues)
    stop = set(lexicon.stopwords)
    found: Dict[str, None] = {}

    def add(first: int, end: int) -> None:
        key_words = _WORD.findall(" ".join(norms[first:end]))
        if not all(item in stop or len(item) == 1 for item in key_words):
            found.setdefault(" ".join(key_words), None)

    def capitalised(index: int) -> bool:
        return index < len(tokens) and tokens[index][0].isupper()

    run_start = -1  # first token of the current capitalised run, -1 when none
    run_at_start = False
    sentence_start = True
    for index in range(len(tokens) + 1):
        token = tokens[index] if index < len(tokens) else "\n"
        norm = norms[index] if index < len(tokens) else ""
        if capitalised(index) or (run_start >= 0 and norm in connectors and capitalised(index + 1)):
            if run_start < 0:
                run_start, run_at_start = index, sentence_start
        elif run_start >= 0:
            first = run_start + 1 if run_at_start else run_start
            while first < index and (norms[first] in connectors or norms[first] in cues):
                first += 1
            if first < index:
                add(first, index)
            run_start = -1
        if norm and any(form in cues for form in lexicon.strip_prefixes(norm)):
            first = index + 2 if tokens[index + 1 : index + 2] == ["."] else index + 1
            end = first
            while end < min(first + 4, len(tokens)) and norms[end] and norms[end] not in stop:
                if end - first >= 2 and norms[end - 1] not in connectors:
                    break
                end += 1
            while end > first and norms[end - 1] in connectors:
                end -= 1
            if end > first:
                add(first, end)
        if token in _SENTENCE_BREAK:
            # "Dr. Smith": a full stop right after a cue word is an abbreviation, not a sentence end.
            sentence_start = not (token == "." and index > 0 and norms[index - 1] in cues)
        elif norm:
            sentence_start = False
    return list(found)


def _fold_token(token: str) -> str:
    """normalize_for_match for one token of NFKC text (no whitespace to collapse)."""
    return normalize_digits(normalize_arabic(token.casefold()))


def entity_kept(entity: str, normalized_text: str) -> bool:
    """Whether the normalised `entity` occurs in `normalized_text` (normalize_for_match form) as whole words."""
    return f" {entity} " in f" {' '.join(_WORD.findall(normalized_text))} " if entity else True
