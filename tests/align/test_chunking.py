"""Splitting documents for the worker's context: exact reconstruction, limits, paragraph boundaries first."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megalign.align.chunking import join_rewrites, split_document

ARABIC = ("الفقرة الأولى عن تاريخ المدينة. وهي قديمة جدا!\n\n"
          "الفقرة الثانية تتحدث عن السوق؟ نعم، السوق كبير.\n"
          "سطر آخر في الفقرة نفسها.\n\n\n"
          "الفقرة الثالثة قصيرة.")


def _words(text: str) -> int:
    return len(text.split())


def test_paragraphs_are_kept_whole_when_they_fit():
    pieces = split_document(ARABIC, 14, _words)
    assert "".join(t + s for t, s in pieces) == ARABIC
    assert [t.split("\n")[0][:14] for t, _ in pieces] == ["الفقرة الأولى ", "الفقرة الثانية", "الفقرة الثالثة"]
    assert [s for _, s in pieces] == ["\n\n", "\n\n\n", ""]
    assert len(split_document(ARABIC, 1000, _words)) == 1


def test_long_paragraphs_split_at_lines_then_sentences_then_words():
    pieces = split_document(ARABIC, 6, _words)
    assert "".join(t + s for t, s in pieces) == ARABIC
    assert all(_words(t) <= 6 for t, _ in pieces)
    assert ("الفقرة الأولى عن تاريخ المدينة.", " ") in pieces  # a sentence end
    assert any(s == "\n" for _, s in pieces)  # a line break
    word = "x" * 25
    cut = split_document(word, 10)
    assert [t for t, _ in cut] == ["x" * 10, "x" * 10, "x" * 5]


def test_join_uses_the_original_separators():
    pieces = split_document(ARABIC, 14, _words)
    joined = join_rewrites(pieces, [f" R{i} " for i in range(len(pieces))])
    assert joined == "R0\n\nR1\n\n\nR2"
    with pytest.raises(ValueError, match="2 rewrites for 3 pieces"):
        join_rewrites(pieces, ["a", "b"])
    with pytest.raises(ValueError, match="max_units"):
        split_document("text", 0)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab ج.؟!\n\t")), max_size=120), st.integers(1, 30))
def test_any_text_round_trips_within_the_limit(text, limit):
    pieces = split_document(text, limit)
    assert "".join(t + s for t, s in pieces) == text
    assert all(len(t) <= limit for t, _ in pieces)
