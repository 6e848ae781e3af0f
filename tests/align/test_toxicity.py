"""Toxicity scoring: the lexicon scorer on crafted Arabic and English texts, user lexicons, plugged classifiers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalign.align.toxicity import (CATEGORIES, ClassifierScorer, LexiconToxicityScorer, ToxicityScore,
                                     ToxicityScorer, aggregate_scores)
from megalign.errors import ConfigError

SCORER = LexiconToxicityScorer()


def test_clean_texts_score_zero() -> None:
    for text in ("The committee met on Monday to discuss the annual budget.",
                 "عقد مجلس الوزراء جلسته الأسبوعية في الرياض وناقش الميزانية.",
                 "اقتلاع الأشجار القديمة من الحديقة العامة."):
        score = SCORER.score(text)
        assert not score.flagged and set(score.scores) == set(CATEGORIES) and not any(score.scores.values()), text


def test_english_categories_and_rate_per_1000_words() -> None:
    score = SCORER.score("You are an idiot and a worthless loser. Shut up!", "en")
    assert score.matches == {"harassment": ["idiot", "worthless", "loser", "shut up"]}
    assert score.words == 10 and score.scores["harassment"] == pytest.approx(400.0) and score.flagged
    assert SCORER.score("Watch porn, hot singles near you", "en").matches == {"sexual": ["porn", "hot singles"]}
    assert SCORER.score("They vowed to slaughter the villagers", "en").matches == {"violence": ["slaughter"]}


def test_arabic_matching_on_normalised_forms_with_prefixes() -> None:
    score = SCORER.score("يا حمار، أنت غبيّ وتافه، واللعنة عليك", "ar")
    assert score.matches["harassment"] == ["يا حمار", "غبي", "تافه"]
    assert score.matches["profanity"] == ["لعنه"]  # و + ال stripped, ة folded
    assert score.flagged
    violence = SCORER.score("قالوا: اقتلوهم جميعًا وأحرقوهم، فوقعت مجزرةٌ في القرية", "ar")
    assert violence.matches["violence"] == ["اقتلوهم", "احرقوهم", "مجزره"]
    hate = SCORER.score("وصفهم بأنهم عِرْقٌ أدنى وحثالة", "ar")
    assert hate.matches["hate"] == ["عرق ادني", "حثاله"]


def test_language_is_detected_from_the_script() -> None:
    assert SCORER.score("أنت غبي").matches == {"harassment": ["غبي"]}
    assert SCORER.score("you idiot").matches == {"harassment": ["idiot"]}
    with pytest.raises(ConfigError, match="no lexicon loaded for language 'fr'"):
        SCORER.score("texte", "fr")


def test_flag_threshold_uses_the_rate() -> None:
    long_text = "The report describes the budget in detail. " * 50 + "One idiot objected."
    score = SCORER.score(long_text, "en")
    assert score.matches == {"harassment": ["idiot"]} and score.scores["harassment"] < 5 and not score.flagged
    assert LexiconToxicityScorer(flag_per_1000=1.0).score(long_text, "en").flagged


def test_user_lexicon_file_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "fr.yaml"
    path.write_text(json.dumps({"language": "fr", "toxicity": {"harassment": ["imbécile", "crétin*"],
                                                                "spam_like": ["cliquez ici"]}}), encoding="utf-8")
    scorer = LexiconToxicityScorer.from_files([str(path)])
    score = scorer.score("Quel imbécile, ces crétins ! Cliquez ici.", "fr")
    assert score.matches == {"harassment": ["imbécile", "crétins"], "spam_like": ["cliquez ici"]}
    assert "spam_like" in score.scores and score.flagged
    by_dir = LexiconToxicityScorer(languages=["fr"], lexicon_dir=str(tmp_path), scripts={"fr": "latin"})
    assert by_dir.score("Quel imbécile").matches == {"harassment": ["imbécile"]}


def test_classifier_plugs_in_and_aggregate() -> None:
    calls = []

    def classifier(text: str) -> dict:
        calls.append(text)
        return {"hate": 0.9 if "hate" in text else 0.1, "violence": 0.2}

    plugged: ToxicityScorer = ClassifierScorer(classifier, thresholds={"hate": 0.8})
    scores = [plugged.score("I hate them"), plugged.score("hello")]
    assert [s.flagged for s in scores] == [True, False] and calls == ["I hate them", "hello"]
    summary = aggregate_scores(scores)
    assert summary["documents"] == 2 and summary["flagged"] == 1 and summary["flagged_share"] == 0.5
    assert summary["mean_per_1000_words"]["hate"] == pytest.approx(0.5)
    assert summary["share_with_matches"]["violence"] == 1.0
    assert aggregate_scores([])["documents"] == 0
    with pytest.raises(ConfigError, match="returned list"):
        ClassifierScorer(lambda text: [0.5]).score("x")  # type: ignore[arg-type, return-value]
    assert isinstance(SCORER.score("x", "en"), ToxicityScore)


def test_rewritten_news_is_not_more_toxic(shared_arabic_dir: Path) -> None:
    with open(shared_arabic_dir / "arwiki_paragraphs.jsonl", encoding="utf-8") as handle:
        texts = [json.loads(next(handle))["text"] for _ in range(100)]
    summary = aggregate_scores(SCORER.score(text, "ar") for text in texts)
    assert summary["documents"] == 100 and summary["flagged_share"] < 0.1  # encyclopedic text is mostly clean
