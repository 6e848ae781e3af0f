"""Model-free text measurements: scripts, normalisation, contact details, numbers, entities, reply hygiene."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalign.align import text_signals as ts
from megalign.errors import ConfigError

AR = ts.load_lexicon("ar")
EN = ts.load_lexicon("en")


def test_script_shares_count_letters_only() -> None:
    shares = ts.script_shares("مرحبا Hello، 123 !!")
    assert shares == {"arabic": 0.5, "latin": 0.5}
    assert ts.script_shares("123 ... ٢٠٢٤") == {}
    assert ts.script_share("٢٠٢٤", "arabic") is None
    # Diacritics are marks, not letters: the share stays 1.0.
    assert ts.script_share("إِنَّا لِلّهِ", "arabic") == 1.0
    with pytest.raises(ConfigError, match="unknown script 'klingon'"):
        ts.script_share("x", "klingon")


def test_detect_language_by_script_with_order_tie_break() -> None:
    languages = {"ar": "arabic", "en": "latin", "fr": "latin"}
    assert ts.detect_language("أعلنت شركة Google اليوم عن نتائجها", languages) == "ar"
    assert ts.detect_language("Google announced its results today", languages) == "en"
    assert ts.detect_language("Bonjour à tous", {"fr": "latin", "en": "latin"}) == "fr"
    assert ts.detect_language("12345", languages) == "ar"
    assert ts.detect_language("12345", languages, default="en") == "en"


def test_arabic_normalisation() -> None:
    assert ts.normalize_arabic("إِنَّا") == "انا"
    assert ts.normalize_arabic("كتـــاب") == "كتاب"
    assert ts.normalize_arabic("أحمد إلى آدم ٱلله") == "احمد الي ادم الله"
    assert ts.normalize_arabic("مدرسة مستشفى") == "مدرسه مستشفي"
    assert ts.normalize_arabic("مدرسة", letters=False) == "مدرسة"
    assert ts.normalize_digits("٢٠٢٤ و ۱۹۹۰") == "2024 و 1990"
    # The same key for spelling variants: usable for dedup.
    assert ts.normalize_for_match("  الـمَدْرَسَةُ   في   ٢٠٢٤ ") == ts.normalize_for_match("المدرسه في 2024")
    assert ts.normalize_for_match("Hello  WORLD") == "hello world"


def test_numbers_unified_across_digit_systems_and_separators() -> None:
    assert ts.extract_numbers("عام ٢٠٢٤") == ts.extract_numbers("عام ۲۰۲۴") == ts.extract_numbers("year 2024") == ["2024"]
    assert ts.extract_numbers("1,500,000 and ١٬٥٠٠٬٠٠٠") == ["1500000", "1500000"]
    assert ts.extract_numbers("3.50 ٣٫٥ 07") == ["3.5", "3.5", "7"]
    assert ts.extract_numbers("1,5") == ["1", "5"]
    assert ts.extract_numbers("2015-08-08") == ["2015", "8", "8"]
    assert ts.extract_numbers("no digits here") == []


def test_contact_details_found_in_both_digit_systems() -> None:
    text = ("اتصل على جوال (0598737458) أو ٠٥٠٥٤٨٥٤٤٥ أو +966 50 123 4567، والموقع www.example.com/offers "
            "أو https://shop.example.sa/x?id=1. راسلنا: info@example.com. Call (555) 123-4567.")
    spans = ts.find_contacts(text)
    assert [(span.kind, span.text) for span in spans] == [
        ("phone", "0598737458"), ("phone", "٠٥٠٥٤٨٥٤٤٥"), ("phone", "+966 50 123 4567"),
        ("url", "www.example.com/offers"), ("url", "https://shop.example.sa/x?id=1"),
        ("email", "info@example.com"), ("phone", "(555) 123-4567")]
    masked = ts.mask_contacts(text)
    assert "0598737458" not in masked and "example" not in masked


def test_numbers_that_are_not_phone_numbers() -> None:
    for text in ("ولد في 13 أكتوبر 1958", "2015-08-08 13", "pi is 3.14159265", "years 1990 2000 2010 2020",
                 "population 1234567", "08/08/2015"):
        assert ts.find_phone_numbers(text) == [], text
    # A phone number right after a year is still found.
    assert [s.text for s in ts.find_phone_numbers("عام 1958 ٠٥٩٨٧٣٧٤٥٨")] == ["٠٥٩٨٧٣٧٤٥٨"]
    assert [s.text for s in ts.find_emails("mail a.b+c@mail.example.org now")] == ["a.b+c@mail.example.org"]
    assert [s.text for s in ts.find_urls("see example.com.")] == ["example.com"]


def test_spam_markers_per_language() -> None:
    text = "للتواصل عبر واتساب. اقرأ المزيد عن العرض الخاص. Click here to subscribe now!"
    assert ts.find_spam_markers(text, AR.spam) == ["للتواصل", "واتساب", "اقرا المزيد"]
    assert ts.find_spam_markers(text, EN.spam) == ["click here", "subscribe now"]
    assert ts.find_spam_markers("Read more. READ MORE!", EN.spam) == ["read more", "read more"]
    assert ts.find_spam_markers("The committee approved the budget.", AR.spam + EN.spam) == []


def test_meta_text_and_refusal_detectors() -> None:
    assert ts.find_meta_text("إليك النص المعاد صياغته:\nالنص", AR.meta_text)
    assert ts.find_meta_text("بالتأكيد! هذا هو النص بعد التعديل", AR.meta_text)
    assert ts.find_meta_text("Sure, here is the rewritten text:\nBody.", EN.meta_text)
    assert ts.find_meta_text("Body of the article.\n\nLet me know if you need more changes.", EN.meta_text)
    assert ts.find_meta_text("The court ruled on Monday. It was sure of its decision.", EN.meta_text) is None
    assert ts.find_meta_text("أعلنت الوزارة اليوم نتائج الاختبارات.", AR.meta_text) is None
    # "^" patterns only match the real start, not the start of the tail window.
    assert ts.find_meta_text("x" * 300 + " ok, fine.", EN.meta_text, tail=10) is None
    assert ts.find_refusal("I'm sorry, but I can't help with that.", EN.refusal)
    assert ts.find_refusal("عذرًا، لا أستطيع المساعدة في هذا الطلب.", AR.refusal)
    assert ts.find_refusal("لا يمكنني إعادة صياغة هذا النص.", AR.refusal)
    assert ts.find_refusal("The minister said he cannot attend.", EN.refusal) is None


def test_ends_sentence() -> None:
    assert ts.ends_sentence("It ended.") and ts.ends_sentence("هل انتهى؟") and ts.ends_sentence('He said "yes."')
    assert ts.ends_sentence("قال: «انتهى.»") and ts.ends_sentence("")
    assert not ts.ends_sentence("and then the") and not ts.ends_sentence("وفي النهاية قرر")


def test_latin_entities() -> None:
    text = "The United Nations said on Monday that Dr. John Smith of Oxford met President Barack Obama in New York."
    entities = ts.extract_entities(text, EN)
    for expected in ("united nations", "john smith", "barack obama", "new york"):
        assert expected in entities
    assert "the" not in entities and "dr" not in entities and "president" not in entities


def test_arabic_entities_follow_cue_words_with_prefixes() -> None:
    text = "وصلّى الناس على الشيخ راشد بن إبراهيم الحبيش في جامع الراجحي، وقال للدكتور خالد المضحي إن جامعة الملك سعود تشارك."
    entities = ts.extract_entities(text, AR)
    assert "راشد بن ابراهيم" in entities  # hamza folded, connector extends the name
    assert "خالد المضحي" in entities     # cue with the prefix ل: للدكتور
    assert "الراجحي" in entities
    assert ts.entity_kept("راشد بن ابراهيم", ts.normalize_for_match("الشيخ راشد بن إبراهيم"))
    assert not ts.entity_kept("خالد المضحي", ts.normalize_for_match("الشيخ خالد"))
    # Without a lexicon only capitalised runs count: Arabic gives nothing.
    assert ts.extract_entities(text) == []


def test_lexicon_files_are_checked_and_user_directory_wins(tmp_path: Path) -> None:
    (tmp_path / "fr.yaml").write_text(json.dumps({"language": "fr", "spam": ["cliquez ici"],
                                                  "toxicity": {"harassment": ["idiot"]}}), encoding="utf-8")
    lexicon = ts.load_lexicon("fr", str(tmp_path))
    assert lexicon.spam == ("cliquez ici",) and lexicon.toxicity["harassment"] == ("idiot",)
    assert ts.load_lexicon("ar", str(tmp_path)) is AR  # not in the directory: the packaged one
    assert ts.load_lexicon("sw").spam == ()  # no lexicon at all: empty
    (tmp_path / "bad.yaml").write_text("language: xx\nstopwords: [yes, 'no']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'stopwords'\[0\].*quote"):
        ts.load_lexicon_file(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad2.yaml").write_text("language: xx\nrefusal: ['(unclosed']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad2.yaml: field 'refusal'\[0\]: invalid regular expression"):
        ts.load_lexicon_file(str(tmp_path / "bad2.yaml"))
    (tmp_path / "bad3.yaml").write_text("language: xx\nspamm: []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown field"):
        ts.load_lexicon_file(str(tmp_path / "bad3.yaml"))
    assert {"ar", "en"} <= set(ts.packaged_lexicon_languages())


def test_real_arabic_news_signals(shared_arabic_dir: Path) -> None:
    with open(shared_arabic_dir / "saudinewsnet_sample.jsonl", encoding="utf-8") as handle:
        records = [json.loads(next(handle)) for _ in range(200)]
    phones = sum(len(ts.find_phone_numbers(record["text"])) for record in records)
    shares = [ts.script_share(record["text"], "arabic") for record in records]
    assert phones >= 1  # the first record is a notice with three mobile numbers
    assert sum(share is not None and share > 0.9 for share in shares) > 0.9 * len(records)
    assert ts.find_phone_numbers(records[0]["text"])[0].text == "0598737458"
