"""fast_bpe: the same ids as Hugging Face `tokenizers` for byte-level BPE, None where it cannot promise that."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import megalign.data.fast_bpe as fast_bpe
from megalign.data.fast_bpe import byte_level_bpe_encoder

TRICKY = [
    "", " ", "\n\n\n", "  leading", "trailing   ", "tabs\t\tx", "crlf\r\nline\r\rcr",
    "emoji 🙂👩‍👩‍👧 and flags 🇸🇦🇪🇬", "combining é é ً ٌ ٍ ﷺ ﷽ ﻻ", "nbsp\u00a0thin\u2009zw\u200b\u200c\u200d",
    "digits ١٢٣٤٥ ۱۲۳ 12345678", "ጤና ይስጥልኝ 中文字符 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚", "x\x00y\x7f",
    "'S 'll 'LL I'M don't", "<|eot_id|>inside<|begin_of_text|><|eot", "a<|pad|>b<|pad|<|end_of_text|>",
    "نص مختلط: Megatron-LM يدرّب النماذج على 8 وحدات GPU في آنٍ واحد.",
    "long pieces " + "ب" * 300 + " " + "xy" * 100 + " " * 150 + "!?" * 80 + "\n" * 70,  # BPE's heap path
]


def random_texts(count: int, seed: int = 7) -> List[str]:
    rng = random.Random(seed)
    alphabet = [chr(rng.randint(32, 0x2FFFF)) for _ in range(5000)]
    alphabet = [c for c in alphabet if not 0xD800 <= ord(c) < 0xE000] + [" ", "\n", "'", "s", "<|", "|>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(count)]


def spacey_texts(count: int, seed: int = 11) -> List[str]:
    """Texts dense in the cases the space cut must get right: runs of spaces, spaces next to other
    whitespace, to punctuation, digits, contractions and added tokens, at both ends."""
    rng = random.Random(seed)
    atoms = [" ", " ", " ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\x1c", "\x85", "كتب", "word", "ال",
             "١٢٣٤", "12345", ".", "،", "!?", "'s", "'LL", "🙂", "é", "<|pad|>", "<|endoftext|>", "\u200b"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def test_isspace_covers_the_patterns_whitespace() -> None:
    """The space cut treats str.isspace characters as whitespace: it must cover every \\s match."""
    regex = pytest.importorskip("regex")
    whitespace = regex.compile(r"\s")
    missed = [hex(code) for code in range(0x110000)
              if not 0xD800 <= code < 0xE000 and whitespace.match(chr(code)) and not chr(code).isspace()]
    assert missed == []


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    """Run a test with BPE and the caches in C++ (megalign._helpers.ByteLevelBPE) and in Python."""
    return request.param


def test_space_cut_only_for_known_patterns(hf_bpe_tokenizer: Path, tmp_path: Path, native: bool) -> None:
    encoder = byte_level_bpe_encoder(str(hf_bpe_tokenizer), native=native)
    assert encoder is not None and encoder.space_cut and encoder.native == native
    encoder.encode("قرأ الطالب الدرس. كتب الطالب")
    assert encoder.knows_word("الطالب") and encoder.knows_word("الدرس.")  # memoized " " + word
    assert not encoder.knows_word("قرأ")  # the first word of a text is not cut out alone
    other = fast_bpe.LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
    path = edited(hf_bpe_tokenizer, tmp_path,
                  lambda c: c["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=other))
    encoder = byte_level_bpe_encoder(path, native=native)
    assert encoder is not None and not encoder.space_cut  # an unknown pattern: regex split only
    assert_same_ids(Path(path), TRICKY + spacey_texts(100), native)


def assert_same_ids(path: Path, texts: List[str], native: bool = True) -> None:
    reference = Tokenizer.from_file(str(path))
    encoder = byte_level_bpe_encoder(str(path), native=native)
    assert encoder is not None and encoder.native == native
    expected = [reference.encode(text, add_special_tokens=False).ids for text in texts]
    assert encoder.encode_batch(texts) == expected
    assert encoder.encode_batch(texts[::-1]) == expected[::-1]  # again, now from warm caches
    assert [encoder.encode(text) for text in texts[:50]] == expected[:50]


def test_same_ids_as_tokenizers_llama3_style(hf_bpe_tokenizer: Path, sample_corpus: Path, native: bool) -> None:
    texts = [json.loads(line)["text"] for line in sample_corpus.read_text(encoding="utf-8").splitlines()]
    assert_same_ids(hf_bpe_tokenizer, TRICKY + random_texts(300) + spacey_texts(400) + texts, native)
    assert byte_level_bpe_encoder(str(hf_bpe_tokenizer.parent)) is not None  # a folder holding tokenizer.json


def test_same_ids_after_the_cache_is_cleared(hf_bpe_tokenizer: Path, sample_corpus: Path,
                                             monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(fast_bpe, "_CACHE_LIMIT", 50)
    texts = [json.loads(line)["text"] for line in sample_corpus.read_text(encoding="utf-8").splitlines()[:60]]
    assert_same_ids(hf_bpe_tokenizer, texts * 2 + spacey_texts(100) * 2, native)


def arabic_texts(directory: Path, per_file: int) -> List[str]:
    texts = []
    for path in sorted(directory.glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line, _ in zip(handle, range(per_file))]
    return texts


def test_same_ids_on_real_arabic(hf_bpe_tokenizer: Path, ignore_merges_tokenizer: Path, shared_arabic_dir: Path) -> None:
    texts = arabic_texts(shared_arabic_dir, per_file=400)
    assert_same_ids(hf_bpe_tokenizer, texts)
    assert_same_ids(ignore_merges_tokenizer, texts)


@pytest.fixture(scope="module")
def ignore_merges_tokenizer(tmp_path_factory: pytest.TempPathFactory, hf_bpe_tokenizer: Path) -> Path:
    """Llama-3 style: ignore_merges=true, "a b" merge strings, and tokens no merge builds (a piece that is
    such a token must become that one id, as tokenizers does)."""
    config = json.loads(hf_bpe_tokenizer.read_text(encoding="utf-8"))
    model = config["model"]
    model["ignore_merges"] = True
    model["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    next_id = max(max(model["vocab"].values()), *(token["id"] for token in config["added_tokens"])) + 1
    for offset, token in enumerate(UNMERGED_TOKENS):
        model["vocab"][token] = next_id + offset
    path = tmp_path_factory.mktemp("ignore_merges") / "tokenizer.json"
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


UNMERGED_TOKENS = ["Ġzyxw", "ĠØ§ÙĦØ·Ø§ÙĦØ¨", "!!!!"]  # " zyxw", " الطالب" and "!!!!" in byte-level form


def test_ignore_merges_maps_vocabulary_pieces_directly(ignore_merges_tokenizer: Path, native: bool) -> None:
    texts = ["a zyxw b", "كتب الطالب الدرس", "wow!!!! zyxw", "zyxwzyxw !!!!!"]
    reference = Tokenizer.from_file(str(ignore_merges_tokenizer))
    vocab = reference.get_vocab()
    assert vocab[UNMERGED_TOKENS[0]] in reference.encode(texts[0]).ids  # the case under test occurs
    assert vocab[UNMERGED_TOKENS[1]] in reference.encode(texts[1]).ids
    assert_same_ids(ignore_merges_tokenizer, texts + TRICKY + spacey_texts(200) + random_texts(100), native)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80) | st.text(st.sampled_from(list(" \n\t'sاللهxyz!١2🙂\u00a0")), max_size=60))
def test_same_ids_on_random_unicode(hf_bpe_tokenizer: Path, ignore_merges_tokenizer: Path, text: str) -> None:
    for path in (hf_bpe_tokenizer, ignore_merges_tokenizer):
        encoder, reference = _encoder_pair(path)
        assert encoder.encode(text) == reference.encode(text, add_special_tokens=False).ids


_PAIRS: dict = {}


def _encoder_pair(path: Path):
    """A (native encoder, tokenizers reference) pair per tokenizer.json, kept across hypothesis examples."""
    if path not in _PAIRS:
        encoder = byte_level_bpe_encoder(str(path))
        assert encoder is not None and encoder.native
        _PAIRS[path] = (encoder, Tokenizer.from_file(str(path)))
    return _PAIRS[path]


@pytest.mark.parametrize("case", ["prefix", "suffix", "byte_fallback", "bad_merge"])
def test_native_only_where_exact(hf_bpe_tokenizer: Path, tmp_path: Path, case: str) -> None:
    """Model options the C++ BPE does not reproduce keep the tokenizer's own model (still exact)."""
    changes = {
        "prefix": lambda m: m.update(continuing_subword_prefix="##"),
        "suffix": lambda m: m.update(end_of_word_suffix="</w>"),
        "byte_fallback": lambda m: m.update(byte_fallback=True),
        "bad_merge": lambda m: m["merges"].append("a b c"),
    }
    path = edited(hf_bpe_tokenizer, tmp_path, lambda c: changes[case](c["model"]))
    assert fast_bpe._native_bpe(json.loads(Path(path).read_text(encoding="utf-8"))["model"]) is None
    if case in ("suffix", "byte_fallback"):  # (the others do not even load in tokenizers)
        encoder = byte_level_bpe_encoder(path)
        assert encoder is not None and not encoder.native
        assert_same_ids(Path(path), TRICKY + spacey_texts(50), native=False)


@pytest.fixture(scope="module")
def gpt2_style_tokenizer(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path) -> Path:
    """A GPT-2 style tokenizer: ByteLevel(use_regex=True) pre-tokenizer, one special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line in sample_corpus.read_text(encoding="utf-8").splitlines()]
    tokenizer.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("gpt2_style") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_same_ids_gpt2_style(gpt2_style_tokenizer: Path, sample_corpus: Path, native: bool) -> None:
    texts = [json.loads(line)["text"] for line in sample_corpus.read_text(encoding="utf-8").splitlines()]
    assert_same_ids(gpt2_style_tokenizer, TRICKY + ["x<|endoftext|>y"] + random_texts(200, seed=3) + spacey_texts(400)
                    + texts, native)


def edited(path: Path, tmp_path: Path, change) -> str:
    config = json.loads(path.read_text(encoding="utf-8"))
    change(config)
    target = tmp_path / "tokenizer.json"
    target.write_text(json.dumps(config), encoding="utf-8")
    return str(target)


@pytest.mark.parametrize("case", ["normalizer", "truncation", "dropout", "lstrip", "prefix_space", "wordpiece"])
def test_not_applicable_returns_none(hf_bpe_tokenizer: Path, gpt2_style_tokenizer: Path, tmp_path: Path,
                                     case: str) -> None:
    changes = {
        "normalizer": lambda c: c.update(normalizer={"type": "NFKC"}),
        "truncation": lambda c: c.update(truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                                                     "stride": 0}),
        "dropout": lambda c: c["model"].update(dropout=0.1),
        "lstrip": lambda c: c["added_tokens"][0].update(lstrip=True),
        "prefix_space": lambda c: c["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
    }
    if case == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.Lowercase()
        path = str(tmp_path / "wordpiece.json")
        tokenizer.save(path)
    else:
        path = edited(hf_bpe_tokenizer, tmp_path, changes[case])
        Tokenizer.from_file(path)  # still a valid tokenizer.json
    assert byte_level_bpe_encoder(path) is None


def test_missing_or_broken_file_returns_none(tmp_path: Path) -> None:
    assert byte_level_bpe_encoder(str(tmp_path / "absent.json")) is None
    (tmp_path / "broken.json").write_text("{not json")
    assert byte_level_bpe_encoder(str(tmp_path / "broken.json")) is None
