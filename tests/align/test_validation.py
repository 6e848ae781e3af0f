"""validate_rewrite: every rejection reason on crafted rewrites, good rewrites accepted, in Arabic and English."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalign.align.guidelines import load_guidelines
from megalign.align.text_signals import load_lexicon
from megalign.align.validation import REASONS, ValidationConfig, knowledge_preservation, validate_rewrite
from megalign.errors import ConfigError

AR_ORIGINAL = (
    "انتقل إلى رحمة الله تعالى الشيخ راشد بن إبراهيم الحبيش، وصُلّي عليه في جامع الراجحي بالرياض يوم ٨ أغسطس ٢٠١٥ "
    "عن عمر ناهز ٧٣ عامًا. وتتقبل الأسرة التعازي في حي بدر، وللتواصل جوال زيد (0598737458). اقرأ المزيد"
)
AR_GOOD = (
    "انتقل إلى رحمة الله تعالى الشيخ راشد بن إبراهيم الحبيش، وصُلّي عليه في جامع الراجحي بالرياض يوم 8 أغسطس 2015 "
    "عن عمر ناهز 73 عامًا. وتتقبل الأسرة التعازي في حي بدر."
)
EN_ORIGINAL = (
    "BREAKING!!! The city council of Springfield approved a budget of $4,500,000 on 12 March 2024, "
    "Mayor Jane Porter said. The vote was 7 to 2. Call 0800 123 4567 or visit www.springfield-news.com. "
    "Read more"
)
EN_GOOD = (
    "The city council of Springfield approved a budget of $4,500,000 on 12 March 2024, Mayor Jane Porter said. "
    "The vote was 7 to 2."
)


@pytest.mark.parametrize("original, good, language", [(AR_ORIGINAL, AR_GOOD, "ar"), (EN_ORIGINAL, EN_GOOD, "en")])
def test_good_rewrite_is_accepted(original: str, good: str, language: str) -> None:
    result = validate_rewrite(original, good, language, finish_reason="stop")
    assert result.ok and result.reason is None, result
    assert result.details["lost_numbers"] == [] and result.details["lost_entities"] == []
    assert result.details["numbers"] >= 3  # the phone number's digits are not counted


def test_unchanged_text_is_accepted() -> None:
    text = "أعلنت وزارة التعليم اليوم نتائج الاختبارات النهائية لعام ٢٠٢٤، وبلغت نسبة النجاح ٩١٪."
    assert validate_rewrite(text, text, "ar").ok


def _reason(original: str, rewritten: str, language: str, **kwargs: object) -> str:
    result = validate_rewrite(original, rewritten, language, **kwargs)  # type: ignore[arg-type]
    assert not result.ok
    return result.reason  # type: ignore[return-value]


def test_empty() -> None:
    assert _reason(AR_ORIGINAL, "", "ar") == "empty"
    assert _reason(AR_ORIGINAL, "  \n ", "ar") == "empty"
    assert _reason(AR_ORIGINAL, None, "ar") == "empty"  # type: ignore[arg-type]


def test_truncated_by_finish_reason_or_mid_sentence() -> None:
    assert _reason(EN_ORIGINAL, EN_GOOD, "en", finish_reason="length") == "truncated"
    original = "The council approved the budget on Monday. The mayor welcomed the decision."
    cut = "The council approved the budget on Monday. The mayor welcomed the"
    assert _reason(original, cut, "en") == "truncated"
    ar_original = "وافق المجلس على الميزانية يوم الاثنين. ورحب رئيس البلدية بالقرار."
    assert _reason(ar_original, "وافق المجلس على الميزانية يوم الاثنين. ورحب رئيس البلدية", "ar") == "truncated"
    # The original itself ends without punctuation (a headline): no mid-sentence judgement.
    assert validate_rewrite("Council approves budget for 2024", "Council approves budget for 2024", "en").ok
    lenient = ValidationConfig(check_mid_sentence=False)
    assert validate_rewrite(original, cut + " news of it", "en", lenient).ok


def test_wrong_script() -> None:
    english = ("The deceased Sheikh Rashid bin Ibrahim Al-Habeesh passed away; prayers were held at Al-Rajhi mosque "
               "in Riyadh on 8 August 2015 at the age of 73. Condolences are received in Badr district.")
    result = validate_rewrite(AR_ORIGINAL, english, "ar")
    assert result.reason == "wrong_script" and result.details["script_share"] == 0.0
    # A code-mixed original may stay code-mixed: the share is compared with the original's.
    mixed = "Apple أعلنت عن iPhone جديد في California، وقال Tim Cook إن الجهاز يدعم USB-C وWi-Fi 7 وBluetooth."
    assert validate_rewrite(mixed, mixed, "ar").ok


def test_length_ratio() -> None:
    assert _reason(AR_ORIGINAL, "انتقل الشيخ إلى رحمة الله.", "ar") == "length_ratio"
    padded = EN_GOOD + " " + " ".join(["The council also discussed many other matters at length."] * 6)
    result = validate_rewrite(EN_ORIGINAL, padded, "en")
    assert result.reason == "length_ratio" and result.details["length_ratio"] > 1.6
    # Short originals may grow by the slack.
    assert validate_rewrite("Hi , see you at 5", "Hi, see you at 5 o'clock.", "en").ok


def test_meta_text() -> None:
    assert _reason(AR_ORIGINAL, "إليك النص المعاد صياغته:\n" + AR_GOOD, "ar") == "meta_text"
    assert _reason(EN_ORIGINAL, "Sure! Here is the rewritten text:\n" + EN_GOOD, "en") == "meta_text"
    # English preamble on an Arabic document: every lexicon's patterns are checked.
    result = validate_rewrite(AR_ORIGINAL, "Here is the rewritten text: " + AR_GOOD, "ar")
    assert result.reason == "meta_text" and "rewritten" in result.details["meta_text"]
    # An original that quotes the phrase may keep it.
    quoting = "The bot replied: here is the rewritten text, and the users laughed. It was 2023."
    assert validate_rewrite(quoting, quoting, "en").ok


def test_refusal() -> None:
    refusal = "عذرًا، لا أستطيع المساعدة في إعادة صياغة هذا النص لأنه يحتوي على بيانات شخصية وأرقام هواتف خاصة."
    assert _reason(AR_ORIGINAL, refusal, "ar") == "refusal"
    en_refusal = ("I'm sorry, but I can't help with rewriting this article because it contains "
                  "contact details of a private person and other material.")
    assert _reason(EN_ORIGINAL, en_refusal, "en") == "refusal"


def test_lost_numbers_ignores_removed_contact_details() -> None:
    dropped = EN_GOOD.replace("$4,500,000", "a large sum").replace("The vote was 7 to 2.", "The vote was clear.")
    result = validate_rewrite(EN_ORIGINAL, dropped, "en")
    assert result.reason == "lost_numbers"
    assert set(result.details["lost_numbers"]) >= {"4500000", "7"}
    # Arabic-Indic digits in the original, ASCII in the rewrite: the same numbers (the good case above);
    # changed numbers are lost.
    changed = AR_GOOD.replace("8 أغسطس 2015", "9 أغسطس 2016")
    result = validate_rewrite(AR_ORIGINAL, changed, "ar")
    assert result.reason == "lost_numbers" and set(result.details["lost_numbers"]) == {"8", "2015"}


def test_lost_entities() -> None:
    renamed = EN_GOOD.replace("Springfield", "the town").replace("Jane Porter", "the mayor")
    result = validate_rewrite(EN_ORIGINAL, renamed, "en")
    assert result.reason == "lost_entities"
    assert {"springfield", "jane porter"} <= set(result.details["lost_entities"])
    anonymised = AR_GOOD.replace("راشد بن إبراهيم الحبيش", "رجل").replace("الراجحي", "الحي").replace("بدر", "شمالي")
    assert _reason(AR_ORIGINAL, anonymised, "ar") == "lost_entities"


def test_every_reason_is_reachable() -> None:
    # The tests above trigger each reason; this pins the documented list and its order.
    assert REASONS == ("empty", "truncated", "wrong_script", "length_ratio", "meta_text", "refusal",
                       "lost_numbers", "lost_entities")


def test_config_checks_and_language_scripts() -> None:
    with pytest.raises(ConfigError, match="policy 'ignore'"):
        ValidationConfig(policy="ignore")
    with pytest.raises(ConfigError, match="min_length_ratio"):
        ValidationConfig(min_length_ratio=2.0, max_length_ratio=1.5)
    with pytest.raises(ConfigError, match="no script known for language 'xx'"):
        validate_rewrite("abc.", "abc.", "xx")
    assert ValidationConfig(policy="drop").policy == "drop"
    config = ValidationConfig(scripts=load_guidelines().scripts | {"xx": "latin"})
    assert validate_rewrite("Bonjour à tous.", "Bonjour à tous.", "xx", config).ok


def test_knowledge_preservation_shares() -> None:
    kept = knowledge_preservation(AR_ORIGINAL, AR_GOOD, load_lexicon("ar"))
    assert kept["numbers"] == 3 and kept["number_share"] == 1.0 and kept["entity_share"] == 1.0
    half = knowledge_preservation("Alice Brown met Bob Stone in 2020 and 2021.", "Alice Brown met someone in 2020.")
    assert half["number_share"] == 0.5 and half["entities"] == 2 and half["entity_share"] == 0.5
    assert knowledge_preservation("no numbers here", "none")["number_share"] is None


def test_identity_rewrites_of_real_news_pass(shared_arabic_dir: Path) -> None:
    with open(shared_arabic_dir / "saudinewsnet_sample.jsonl", encoding="utf-8") as handle:
        texts = [json.loads(next(handle))["text"] for _ in range(100)]
    results = [validate_rewrite(text, text, "ar") for text in texts]
    assert all(result.ok for result in results), [r.reason for r in results if not r.ok][:5]
