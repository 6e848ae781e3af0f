"""Exact, faster encoding for Hugging Face byte-level BPE tokenizers (GPT-2 / Llama-3 style tokenizer.json).

`tokenizers` encodes such text in four steps: split out added tokens, split the rest with the
pre-tokenizer's regex, map each piece's UTF-8 bytes to byte-level characters, and run BPE on each
piece on its own. The regex step (Oniguruma, in Rust) is the slow part (~3.5 MB/s on Arabic news);
BPE of a piece never depends on its neighbours. ByteLevelBPEEncoder keeps the same four steps but
splits with the `regex` module and memoizes piece -> ids: same ids as
`Tokenizer.encode(text, add_special_tokens=False)`. BPE itself runs in C++ (megalign._helpers.ByteLevelBPE,
csrc/bpe/byte_level_bpe.h: tokenizers' merge order, ignore_merges honoured) built from the
tokenizer.json vocabulary and merges, for plain byte-level models (no subword prefix or word
suffix, no byte fallback, every byte a token); otherwise the tokenizer's own BPE model is asked
for unseen pieces through its Python binding (slower, same ids).

For the GPT-2 and Llama-3 patterns (SPACE_CUT_PATTERNS) it skips most regex work. These patterns
match every character (no gaps), no match holds a non-whitespace character followed by a space,
nothing looks behind, and their one lookahead, (?!\\S), succeeds alike before a space and at the end
of a text. So a text cut before every single space with non-whitespace on both sides splits into
the same pieces chunk by chunk. The encoder cuts with str.split(" ") and memoizes clean words (no
whitespace at either end) -> ids of " " + word; only words it has not seen (all of a text's new
words in one regex call) and words next to other whitespace go through the regex. With the C++
model this whole loop is one C++ call per batch (ByteLevelBPE.encode_segments: ~20 MB/s cold and
~80 MB/s warm on one core, Arabic news), which calls back once for the regex split of what it has
not seen; in Python, cached ids are tuples of ints, which the cyclic garbage collector stops
tracking (large caches of lists made it rescan them over and over).

`byte_level_bpe_encoder(path)` returns None whenever a tokenizer.json does something this module
does not reproduce (a normalizer, another pre-tokenizer, BPE dropout, truncation or padding, added
tokens with lstrip/rstrip/single_word) or when `regex` is not installed; callers then use the
tokenizer itself. One caveat: the two regex engines may disagree on characters of Unicode versions
newer than the older engine knows (e.g. scripts added in Unicode 16); such text is vanishingly rare
in pre-training corpora and still tokenizes validly, but not necessarily identically.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import os
from typing import Dict, List, Optional, Sequence, Tuple, cast

#: The pre-tokenizer regex of ByteLevel(use_regex=True) (GPT-2), as in tokenizers' byte_level.rs.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: The Llama-3 pre-tokenizer regex (Split, Isolated), as in Meta's tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Patterns for which cutting before a single space between non-whitespace keeps the pieces (see above).
SPACE_CUT_PATTERNS = frozenset({GPT2_PATTERN, LLAMA3_PATTERN})
_POST_PROCESSORS = {"ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing"}
_TOKEN_ID = operator.attrgetter("id")
_CACHE_LIMIT = 1 << 20  # memoized pieces per encoder; the cache is cleared when it grows past this


def _byte_level_alphabet() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel pre-tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _split_pattern(pre_tokenizer: Optional[dict]) -> Optional[str]:
    """The regex of a supported byte-level pre-tokenizer, else None."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space") or not pre_tokenizer.get("use_regex", True):
            return None
        return GPT2_PATTERN
    if pre_tokenizer.get("type") != "Sequence" or len(pre_tokenizer.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre_tokenizer["pretokenizers"]
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in (split.get("pattern") or {})
    ):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
        return None
    return split["pattern"]["Regex"]


def _safe_cut(left: str, right: str) -> bool:
    """Whether a space-cut pattern's pieces may be cut at the space between words `left` and `right`."""
    return bool(left) and bool(right) and not left[-1].isspace() and not right[0].isspace()


def _post_processor_is_neutral(processor: Optional[dict]) -> bool:
    """Whether the post-processor adds nothing when add_special_tokens=False (it may only touch offsets)."""
    if processor is None:
        return True
    if processor.get("type") == "Sequence":
        return all(_post_processor_is_neutral(item) for item in processor.get("processors", []))
    return processor.get("type") in _POST_PROCESSORS


class ByteLevelBPEEncoder:
    """Encodes like a byte-level BPE tokenizer.json, with a piece cache and the `regex` module."""

    def __init__(self, tokenizer, pattern: str, added_tokens: Sequence[dict], native=None) -> None:
        import regex

        self._model = None if tokenizer is None else tokenizer.model  # used only without `native`
        self._native = native  # a megalign._helpers.ByteLevelBPE for the same model, or None
        self._pattern = regex.compile(pattern)
        self._to_byte_level = str.maketrans({chr(byte): char for byte, char in _byte_level_alphabet().items()})
        # tokenizers matches added tokens in two passes (not normalized, then normalized), each
        # leftmost-longest; a longest-first alternation finds the same matches.
        self._added_ids = {token["content"]: token["id"] for token in added_tokens}
        self._added_first_chars = sorted({token["content"][0] for token in added_tokens})
        self._added_passes = []
        for normalized in (False, True):
            contents = sorted(
                (t["content"] for t in added_tokens if bool(t.get("normalized")) == normalized),
                key=lambda text: (-len(text), text),
            )
            if contents:
                self._added_passes.append(regex.compile("|".join(regex.escape(text) for text in contents)))
        self._cache: Dict[str, Tuple[int, ...]] = {}
        #: Whether texts are cut before single spaces and whole words memoized (see the module docstring).
        self.space_cut = pattern in SPACE_CUT_PATTERNS
        self._word_cache: Optional[Dict[str, Tuple[int, ...]]] = {} if self.space_cut and native is None else None

    @property
    def native(self) -> bool:
        """Whether BPE and the caches run in C++ (megalign._helpers.ByteLevelBPE)."""
        return self._native is not None

    def knows_word(self, word: str) -> bool:
        """Whether the word cache holds `word` (memoized as the ids of " " + word)."""
        if self._native is not None:
            return self.space_cut and self._native.has_word(word)
        return self._word_cache is not None and word in self._word_cache

    def _segments(self, text: str) -> List[Tuple[str, bool]]:
        """`text` cut into (segment, is_added_token) pieces."""
        segments = [(text, False)]
        for matcher in self._added_passes:
            cut: List[Tuple[str, bool]] = []
            for segment, is_added in segments:
                if is_added:
                    cut.append((segment, True))
                    continue
                position = 0
                for match in matcher.finditer(segment):
                    if match.start() > position:
                        cut.append((segment[position : match.start()], False))
                    cut.append((match.group(), True))
                    position = match.end()
                if position < len(segment):
                    cut.append((segment[position:], False))
            segments = cut
        return segments

    def _pieces(self, segment: str) -> List[str]:
        """The pre-tokenizer's Isolated split: regex matches, and the gaps between them as pieces."""
        pieces = self._pattern.findall(segment)
        if sum(map(len, pieces)) == len(segment):
            return pieces
        pieces, position = [], 0
        for match in self._pattern.finditer(segment):
            if match.start() > position:
                pieces.append(segment[position : match.start()])
            pieces.append(match.group())
            position = match.end()
        if position < len(segment):
            pieces.append(segment[position:])
        return pieces

    def _piece_ids(self, pieces: List[str]) -> List[Tuple[int, ...]]:
        """BPE of each piece by the tokenizer's own model, memoized; cached pieces are not recomputed."""
        cache = self._cache
        missing = [piece for piece in dict.fromkeys(pieces) if piece not in cache]
        if missing:
            if len(cache) + len(missing) > _CACHE_LIMIT:
                cache.clear()
                missing = list(dict.fromkeys(pieces))
            if self._native is not None:
                cache.update(zip(missing, self._native.encode_pieces(missing)))
                return [cache[piece] for piece in pieces]
            model = self._model
            assert model is not None  # the tokenizer's own model is loaded whenever there is no native one
            # Map all pieces to byte-level characters at once (one character per UTF-8 byte), cut them
            # apart again by their byte lengths and run the model on each (C-level iterators).
            encoded = list(map(str.encode, missing))
            mapped = b"".join(encoded).decode("latin-1").translate(self._to_byte_level)
            ends = list(itertools.accumulate(map(len, encoded)))
            words = map(mapped.__getitem__, map(slice, [0] + ends[:-1], ends))
            cache.update(zip(missing, map(tuple, map(map, itertools.repeat(_TOKEN_ID), map(model.tokenize, words)))))
        return [cache[piece] for piece in pieces]

    def _encode_pieces(self, segment: str, ids: List[int]) -> None:
        """Append the ids of `segment`: regex split, then each piece from the cache or the model."""
        pieces = self._pieces(segment)
        found = list(map(self._cache.get, pieces))  # the common case runs in C: every piece cached
        ids.extend(
            itertools.chain.from_iterable(
                self._piece_ids(pieces) if None in found else cast(List[Tuple[int, ...]], found)
            )
        )

    def _encode_words(self, segment: str, ids: List[int]) -> None:
        """Append the ids of `segment` for a space-cut pattern: cached words, the regex for the rest.

        Word i > 0 stands for " " + word. The cut before word i is safe when words i-1 and i are
        both non-empty and no whitespace touches the space between them (str.isspace covers every
        character the patterns' \\s matches). Only clean words (no whitespace at either end) are
        cached, so a cached word always sits between safe cuts. A missing clean word between safe
        cuts is encoded with the others of the text in one regex call and memoized; any other miss
        (the first word, words next to unsafe cuts) is merged with its neighbours up to safe cuts.
        """
        word_cache = self._word_cache
        assert word_cache is not None  # only called for a space-cut pattern without the native encoder
        words = segment.split(" ")
        found: List[Optional[Sequence[int]]] = list(map(word_cache.get, words))
        found[0] = None  # the first word has no space before it
        last = len(words)
        misses = list(itertools.compress(range(last), map(operator.not_, found)))
        lone: List[int] = []
        end = 0
        for index in misses:
            if index < end:  # already inside the previous group
                continue
            word = words[index]
            if (
                index
                and word
                and words[index - 1]
                and not word[0].isspace()
                and not word[-1].isspace()
                and not words[index - 1][-1].isspace()
                and (index + 1 == last or (words[index + 1] and not words[index + 1][0].isspace()))
            ):
                lone.append(index)  # a clean word between safe cuts (the common miss)
                end = index + 1
                continue
            start, end = index, index + 1
            while start > 0 and not _safe_cut(words[start - 1], words[start]):
                start -= 1
            while end < last and not _safe_cut(words[end - 1], words[end]):
                end += 1
            chunk = " ".join(words[start:end])
            chunk_ids: List[int] = []
            self._encode_pieces(" " + chunk if start else chunk, chunk_ids)
            found[start] = chunk_ids
            found[start + 1 : end] = [()] * (end - start - 1)
        if lone:
            self._memoize_words(list(dict.fromkeys([words[index] for index in lone])))
            for index in lone:
                found[index] = word_cache[words[index]]
        # Every miss is filled in by now: a group's first entry holds its ids, the others ().
        ids.extend(itertools.chain.from_iterable(cast(List[Sequence[int]], found)))

    def _memoize_words(self, new_words: List[str]) -> None:
        """Cache the ids of " " + word for distinct clean words, with one regex call over all of them."""
        pieces = self._pieces(" " + " ".join(new_words))
        piece_ids = self._piece_ids(pieces)
        # The cuts between the words are safe, so each word owns a run of pieces and of their ids:
        # a word's ids end where the piece ending at the word's end offset ends (C-level iterators).
        tokens_before = dict(zip(itertools.accumulate(map(len, pieces)), itertools.accumulate(map(len, piece_ids))))
        stops = list(map(tokens_before.__getitem__, itertools.accumulate(map((1).__add__, map(len, new_words)))))
        flat = tuple(itertools.chain.from_iterable(piece_ids))
        word_ids = map(flat.__getitem__, map(slice, [0] + stops[:-1], stops))
        word_cache = self._word_cache
        assert word_cache is not None  # called by _encode_words only
        if len(word_cache) + len(new_words) > _CACHE_LIMIT:
            word_cache.clear()
        word_cache.update(zip(new_words, word_ids))

    def _encode_segment(self, segment: str, ids: List[int]) -> None:
        if self._word_cache is not None:
            self._encode_words(segment, ids)
        else:
            self._encode_pieces(segment, ids)

    def _split_all(self, texts: List[str]) -> List[List[str]]:
        """The pre-tokenizer pieces of each text (the callback of the C++ space-cut encoder)."""
        return list(map(self._pieces, texts))

    def _encode_batch_native(self, texts: Sequence[str]) -> List[List[int]]:
        """encode_batch with the C++ space-cut encoder: one call per batch; added tokens cut out here."""
        texts = list(texts)
        first_chars = self._added_first_chars
        if not any(char in text for text in texts for char in first_chars):
            return self._native.encode_segments(texts, self._split_all)
        plans = [self._segments(text) for text in texts]
        segment_ids = iter(
            self._native.encode_segments(
                [segment for plan in plans for segment, is_added in plan if not is_added], self._split_all
            )
        )
        results = []
        for plan in plans:
            ids: List[int] = []
            for segment, is_added in plan:
                if is_added:
                    ids.append(self._added_ids[segment])
                else:
                    ids.extend(next(segment_ids))
            results.append(ids)
        return results

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, equal to tokenizers' encode(text, add_special_tokens=False).ids."""
        if self._native is not None and self.space_cut:
            return self._encode_batch_native([text])[0]
        ids: List[int] = []
        if not any(char in text for char in self._added_first_chars):
            self._encode_segment(text, ids)
            return ids
        for segment, is_added in self._segments(text):
            if is_added:
                ids.append(self._added_ids[segment])
            else:
                self._encode_segment(segment, ids)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """encode() of each text."""
        if self._native is not None and self.space_cut:
            return self._encode_batch_native(texts)
        return [self.encode(text) for text in texts]


@functools.lru_cache(maxsize=1)
def _whitespace_code_points() -> List[int]:
    """The code points str.isspace accepts (the space cut's notion of whitespace).

    All of Unicode is decoded into one string and cut with str.split(), which cuts exactly at
    str.isspace characters: they are what lies between the parts (numpy keeps this to ~15 ms).
    """
    import numpy

    code_points = numpy.arange(0x110000, dtype="<u4")
    everything = numpy.concatenate([code_points[:0xD800], code_points[0xE000:]]).tobytes().decode("utf-32-le")
    spaces: List[int] = []
    position = 0
    for part in everything.split():
        start = everything.index(part, position)
        spaces += map(ord, everything[position:start])
        position = start + len(part)
    spaces += map(ord, everything[position:])
    return spaces


def _native_bpe(model: dict):
    """A megalign._helpers.ByteLevelBPE for a tokenizer.json BPE model, or None where it would differ.

    It needs the plain byte-level model: no subword prefix or word suffix, no byte fallback, no
    dropout, and a token for each of the 256 bytes (so unknown characters never occur). Tokens and
    merges with characters outside the byte-level alphabet can never match a piece; C++ leaves them out.
    """
    try:
        import megalign._helpers as _helpers
    except ImportError:
        return None
    if (
        model.get("continuing_subword_prefix") is not None
        or model.get("end_of_word_suffix") is not None
        or model.get("byte_fallback")
        or model.get("dropout")
        or not isinstance(model.get("vocab"), dict)
        or not isinstance(model.get("merges", []), list)
    ):
        return None
    alphabet = _byte_level_alphabet()
    try:
        return _helpers.ByteLevelBPE(
            model["vocab"],
            model.get("merges", []),
            bool(model.get("ignore_merges", False)),
            [ord(alphabet[byte]) for byte in range(256)],
            _whitespace_code_points(),
            _CACHE_LIMIT,
        )
    except Exception:  # noqa: BLE001 - e.g. a byte without a token: the tokenizer's own model is used
        return None


def _load_tokenizer(json_path: str):
    """tokenizers.Tokenizer.from_file (imported here: the C++ path does not need it)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(json_path)


def byte_level_bpe_encoder(model_path: str, native: bool = True) -> Optional[ByteLevelBPEEncoder]:
    """A ByteLevelBPEEncoder for a tokenizer.json (or a folder holding one), or None if not applicable.

    With `native` (the default) BPE and the caches run in C++ whenever the model allows it.
    """
    json_path = os.path.join(model_path, "tokenizer.json") if os.path.isdir(model_path) else model_path
    try:
        import regex  # noqa: F401 - an optional dependency (installed with transformers)

        with open(json_path, "r", encoding="utf-8") as handle:
            config = json.load(handle)
    except Exception:  # noqa: BLE001 - any problem: the caller keeps the regular tokenizer
        return None
    model = config.get("model") or {}
    pattern = _split_pattern(config.get("pre_tokenizer"))
    added = config.get("added_tokens") or []
    if (
        pattern is None
        or config.get("normalizer") is not None
        or config.get("truncation") is not None
        or config.get("padding") is not None
        or model.get("type") != "BPE"
        or model.get("dropout")
        or not _post_processor_is_neutral(config.get("post_processor"))
        or any(token.get(flag) for token in added for flag in ("lstrip", "rstrip", "single_word"))
        or any(not token.get("content") for token in added)
    ):
        return None
    core = _native_bpe(model) if native else None
    try:
        # The tokenizer's own BPE model is needed only without the C++ one.
        tokenizer = None if core is not None else _load_tokenizer(json_path)
        encoder = ByteLevelBPEEncoder(tokenizer, pattern, added, core)
    except Exception:  # noqa: BLE001 - a file tokenizers rejects, a pattern the regex module cannot compile
        return None
    if encoder._pattern.search("") is not None:  # a pattern matching empty strings: not reproduced here
        return None
    return encoder
