"""The seed stage: seeded random choice independent of file order, perplexity strategies, resumable scoring."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalign.align.records import StageInput
from megalign.align.seed import run_seed, select_by_perplexity
from megalign.errors import ConfigError


def _corpus(path: Path, n: int = 40) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"d{i}", "text": "كلمة " * (i + 1)}, ensure_ascii=False) for i in range(n)]
    (path / "a.jsonl").write_text("\n".join(lines[:25]) + "\n", encoding="utf-8")
    (path / "b.jsonl").write_text("\n".join(lines[25:]) + "\n", encoding="utf-8")
    return path


def _ids(directory: Path):
    return [r["id"] for r in StageInput([str(directory)])]


def test_random_seed_is_reproducible_and_independent_of_file_order(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    run_seed([str(corpus)], str(tmp_path / "s1"), 10, seed=7)
    chosen = _ids(tmp_path / "s1")
    assert len(chosen) == 10 and len(set(chosen)) == 10
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    lines = (corpus / "a.jsonl").read_text().splitlines() + (corpus / "b.jsonl").read_text().splitlines()
    (reordered / "all.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    run_seed([str(reordered)], str(tmp_path / "s2"), 10, seed=7)
    assert sorted(_ids(tmp_path / "s2")) == sorted(chosen)
    run_seed([str(corpus)], str(tmp_path / "s3"), 10, seed=8)
    assert sorted(_ids(tmp_path / "s3")) != sorted(chosen)
    record = next(iter(StageInput([str(tmp_path / "s1")])))
    assert record["seed_strategy"] == "random" and record["text"].startswith("كلمة")


def _length_scorer(calls):
    def score(texts):
        calls.append(len(texts))
        return [float(len(t.split())) for t in texts]
    return score


def test_perplexity_strategies_choose_high_low_and_strata(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    calls = []
    run_seed([str(corpus)], str(tmp_path / "hi"), 5, "ppl-high", scorer=_length_scorer(calls), batch_size=16)
    assert sorted(_ids(tmp_path / "hi")) == sorted(f"d{i}" for i in range(35, 40))
    assert sum(calls) == 40 and max(calls) <= 16
    run_seed([str(corpus)], str(tmp_path / "lo"), 5, "ppl-low", scorer=_length_scorer([]))
    assert sorted(_ids(tmp_path / "lo")) == sorted(f"d{i}" for i in range(5))
    run_seed([str(corpus)], str(tmp_path / "st"), 4, "ppl-stratified", scorer=_length_scorer([]))
    strata = sorted(int(i[1:]) for i in _ids(tmp_path / "st"))
    assert [k // 10 for k in strata] == [0, 1, 2, 3]  # one from each quarter of the perplexity range
    record = next(iter(StageInput([str(tmp_path / "hi")])))
    assert record["perplexity"] == float(len(record["text"].split()))


def test_candidates_limit_scoring_and_scores_are_not_recomputed(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    calls = []
    run_seed([str(corpus)], str(tmp_path / "c"), 3, "ppl-high", candidates=12, scorer=_length_scorer(calls))
    assert sum(calls) == 12
    again = []
    (tmp_path / "c" / "part-00000-of-00001.jsonl").unlink()  # as if killed before the output was finished
    (tmp_path / "c" / "part-00000-of-00001.summary.json").unlink()
    run_seed([str(corpus)], str(tmp_path / "c"), 3, "ppl-high", candidates=12, scorer=_length_scorer(again))
    assert sum(again) == 0 and len(_ids(tmp_path / "c")) == 3


def test_unscorable_documents_are_never_chosen(tmp_path):
    corpus = _corpus(tmp_path / "corpus", 10)

    def scorer(texts):
        return [float("nan") if len(t.split()) < 4 else float(len(t.split())) for t in texts]

    run_seed([str(corpus)], str(tmp_path / "lo"), 3, "ppl-low", scorer=scorer)
    assert sorted(_ids(tmp_path / "lo")) == ["d3", "d4", "d5"]


def test_seed_with_a_real_reference_checkpoint(tmp_path, tiny_llama_checkpoint):
    from megalign.inference.model_loading import checkpoint_scorer

    corpus = _corpus(tmp_path / "corpus", 12)
    scorer = checkpoint_scorer(str(tiny_llama_checkpoint))
    run_seed([str(corpus)], str(tmp_path / "hi"), 3, "ppl-high", scorer=scorer, batch_size=4)
    records = list(StageInput([str(tmp_path / "hi")]))
    expected = sorted(scorer([r["text"] for r in StageInput([str(corpus)])]))[-3:]
    assert sorted(r["perplexity"] for r in records) == pytest.approx(expected)


def test_seed_errors():
    with pytest.raises(ConfigError, match="--num 0"):
        run_seed(["x"], "y", 0)
    with pytest.raises(ConfigError, match="pass --load"):
        run_seed(["x"], "y", 3, "ppl-low")
    assert select_by_perplexity({"a": 1.0, "b": 2.0}, 5, "ppl-stratified", 0) == ["a", "b"]
