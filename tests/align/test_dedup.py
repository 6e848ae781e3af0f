"""The dedup stage: exact and near duplicates, keepers, report, sharded = unsharded, resume, errors."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List

import pytest

from megalign.align import dedup as dedup_module
from megalign.align.dedup import DedupConfig, REPORT_FILE, run_dedup
from megalign.align.records import StageInput
from megalign.align.stage_output import ShardOutput, read_manifest
from megalign.errors import BadRecordError, ConfigError, DataFormatError

WORDS = ["المدرسة", "الكتاب", "الطالب", "المعلم", "السماء", "البحر", "المدينة", "الطريق", "الجبل", "النهر",
         "الشمس", "القمر", "الحديقة", "السوق", "البيت", "الشجرة", "river", "market", "garden", "school"]


def _doc(rng: random.Random, words: int = 60) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words)) + "."


def _edit(rng: random.Random, text: str, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        chars[rng.randrange(len(chars))] = rng.choice("abcxyz")
    return "".join(chars)


def _corpus() -> List[Dict[str, str]]:
    """40 distinct docs plus planted duplicates; ids say what each is."""
    rng = random.Random(7)
    records = [{"id": f"d{k:02d}", "text": _doc(rng)} for k in range(40)]
    base = records[3]["text"]
    variants = {  # exact after key normalisation: diacritics, tatweel, alef variants, case, spaces
        "x1": base.replace("الكتاب", "الكِتَاب").replace("المدرسة", "المـدرسة"),
        "x2": base.replace("الطالب", "ألطالب").replace("  ", " ").upper(),
        "x3": "  " + base.replace(" ", "   ") + "\n",
    }
    records += [{"id": rid, "text": text} for rid, text in variants.items()]
    records.append({"id": "n1", "text": _edit(rng, records[10]["text"], 3)})  # near duplicates of d10
    records.append({"id": "n2", "text": _edit(rng, records[10]["text"], 4)})
    records.append({"id": "n3", "text": records[20]["text"][:-40]})  # d20 with its end cut
    records.insert(5, {"id": "early", "text": _edit(rng, records[30]["text"], 2)})  # before d30: it is the keeper
    records.append({"id": "same-as-d00", "text": records[0]["text"]})
    records.append({"text": records[1]["text"]})  # no id: a hash of the text
    return records


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _output_records(directory: Path) -> List[dict]:
    return [json.loads(line) for path in sorted(directory.glob("part-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def _ordered_ids(corpus_path: Path, directory: Path) -> List[str]:
    """The output ids in input order (whatever part they are in)."""
    kept = {r["id"] for r in _output_records(directory)}
    return [r["id"] for r in StageInput([str(corpus_path)], duplicate_ids="keep") if r["id"] in kept]


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return _write(tmp_path / "corpus.jsonl", _corpus())


def test_exact_and_near_duplicates_are_removed_and_the_first_is_kept(corpus, tmp_path):
    out = tmp_path / "out"
    report = run_dedup([str(corpus)], str(out), progress=False)
    kept = _output_records(out)
    kept_ids = [r["id"] for r in kept]
    expected = [f"d{k:02d}" for k in range(40) if k != 30]
    assert kept_ids == expected[:5] + ["early"] + expected[5:]  # input order; d30 lost to "early", before it
    originals = {r.get("id"): r for r in _corpus()}
    assert all(r == originals[r["id"]] for r in kept)  # written unchanged
    assert report["input_records"] == 49 and report["kept_records"] == 40 and report["removed_records"] == 9

    exact = report["exact_duplicates"]
    assert exact["removed"] == 5 and exact["clusters"] == 3
    clusters = {c["keeper"]: c for c in exact["listed"]}
    assert clusters["d03"]["removed"] == ["x1", "x2", "x3"] and clusters["d03"]["num_removed"] == 3
    assert clusters["d00"]["removed"] == ["same-as-d00"] and len(clusters["d01"]["removed"]) == 1

    near = report["near_duplicates"]
    assert near["removed"] == 4 and near["clusters"] == 3 and near["linked_pairs"] >= 4
    listed = {c["keeper"]: c for c in near["listed"]}
    assert [r["id"] for r in listed["d10"]["removed"]] == ["n1", "n2"]
    assert [r["id"] for r in listed["early"]["removed"]] == ["d30"]
    assert all(0.8 <= r["similarity"] <= 1.0 for c in near["listed"] for r in c["removed"])
    assert json.loads((out / REPORT_FILE).read_text(encoding="utf-8")) == report
    manifest = read_manifest(out)
    assert manifest["stage"] == "dedup" and manifest["missing_shards"] == [] and manifest["records"] == 40
    assert len(list(StageInput([str(out)]))) == 40  # the next stage can read it (ids unique)


def test_threshold_decides_borderline_pairs(tmp_path):
    rng = random.Random(3)
    base = _doc(rng, 80)
    words = base.split()
    half = " ".join(w if k % 4 else _doc(rng, 1)[:-1] for k, w in enumerate(words)) + "."  # ~1/4 words replaced
    corpus = _write(tmp_path / "c.jsonl", [{"id": "a", "text": base}, {"id": "b", "text": half}])
    strict = run_dedup([str(corpus)], str(tmp_path / "strict"), DedupConfig(threshold=0.9), progress=False)
    assert strict["kept_records"] == 2 and strict["near_duplicates"]["removed"] == 0
    loose = run_dedup([str(corpus)], str(tmp_path / "loose"), DedupConfig(threshold=0.3), progress=False)
    assert loose["kept_records"] == 1
    similarity = loose["near_duplicates"]["listed"][0]["removed"][0]["similarity"]
    assert 0.3 <= similarity < 0.9


def test_sharded_then_finalised_equals_unsharded(corpus, tmp_path):
    whole = run_dedup([str(corpus)], str(tmp_path / "whole"), progress=False)
    sharded = tmp_path / "sharded"
    for index in (2, 0, 1):  # any order
        meta = run_dedup([str(corpus)], str(sharded), shard_index=index, num_shards=3, progress=False)
        assert meta["records"] == len(range(index, 49, 3))
    assert not list(sharded.glob("part-*"))  # sketching writes no output
    report = run_dedup([str(corpus)], str(sharded), num_shards=3, finalize_only=True, progress=False)
    assert report == whole
    assert _ordered_ids(corpus, sharded) == _ordered_ids(corpus, tmp_path / "whole")
    parts = sorted(p.name for p in sharded.glob("part-*.jsonl"))
    assert parts == [f"part-0000{i}-of-00003.jsonl" for i in range(3)]
    for index in range(3):  # part i holds the kept records of input shard i, in input order
        shard_ids = [r["id"] for r in StageInput([str(corpus)], index, 3, duplicate_ids="keep")]
        part_ids = [r["id"] for r in _output_records(sharded) if r["id"] in shard_ids]
        written = [json.loads(line)["id"] for line in (sharded / parts[index]).read_text().splitlines()]
        assert written == part_ids
    # a rerun of a finished shard or of the finalise changes nothing
    run_dedup([str(corpus)], str(sharded), shard_index=1, num_shards=3, progress=False)
    assert run_dedup([str(corpus)], str(sharded), num_shards=3, progress=False) == whole


def test_resume_after_a_killed_finalise(corpus, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run_dedup([str(corpus)], str(clean), progress=False)
    out = tmp_path / "out"
    for index in range(2):
        run_dedup([str(corpus)], str(out), shard_index=index, num_shards=2, progress=False)
    original_write = ShardOutput.write
    written = []

    def crashing_write(self, record):
        if len(written) == 25:  # part 0 finished (20 records), part 1 half written
            raise KeyboardInterrupt
        original_write(self, record)
        written.append(record["id"])

    monkeypatch.setattr(ShardOutput, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run_dedup([str(corpus)], str(out), num_shards=2, progress=False)
    assert (out / "part-00000-of-00002.jsonl").exists() and (out / "part-00001-of-00002.jsonl.partial").exists()
    assert read_manifest(out)["missing_shards"] == [1]
    monkeypatch.setattr(ShardOutput, "write", original_write)
    report = run_dedup([str(corpus)], str(out), num_shards=2, progress=False)
    assert report == json.loads((clean / REPORT_FILE).read_text(encoding="utf-8"))
    ids = [r["id"] for r in _output_records(out)]
    assert len(ids) == len(set(ids)) == 40
    assert _ordered_ids(corpus, out) == _ordered_ids(corpus, clean)


def test_missing_shards_and_changed_settings_are_named(corpus, tmp_path):
    out = tmp_path / "out"
    run_dedup([str(corpus)], str(out), shard_index=1, num_shards=4, progress=False)
    with pytest.raises(DataFormatError, match=r"signatures of shard\(s\) 0, 2, 3 of 4 are missing"):
        run_dedup([str(corpus)], str(out), num_shards=4, progress=False)
    with pytest.raises(ConfigError, match="ngram: 5 then 4"):
        run_dedup([str(corpus)], str(out), DedupConfig(ngram=4), shard_index=1, num_shards=4, progress=False)
    for index in (0, 2, 3):
        run_dedup([str(corpus)], str(out), shard_index=index, num_shards=4, progress=False)
    with pytest.raises(ConfigError, match="rows"):  # another threshold means other LSH bands
        run_dedup([str(corpus)], str(out), DedupConfig(threshold=0.5), num_shards=4, progress=False)


def _cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    dedup_module.add_arguments(parser)
    return dedup_module.main(parser.parse_args(argv))


def test_command_line_and_bad_flags(corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _cli(["--input", str(corpus), "--output", out, "--shard-index", "0", "--num-shards", "2"]) == 0
    assert "--finalize" in capsys.readouterr().out
    with pytest.raises(DataFormatError, match=r"shard\(s\) 1 of 2 are missing"):
        _cli(["--input", str(corpus), "--output", out, "--num-shards", "2", "--finalize"])
    assert _cli(["--input", str(corpus), "--output", out, "--shard-index", "1", "--num-shards", "2"]) == 0
    assert _cli(["--input", str(corpus), "--output", out, "--num-shards", "2"]) == 0
    assert "kept 40, removed 5 exact (3 clusters) and 4 near duplicates (3 clusters)" in capsys.readouterr().out
    bad = [(["--shard-index", "0"], "--shard-index needs --num-shards"),
           (["--shard-index", "0", "--num-shards", "2", "--finalize"], "--finalize clusters all shards"),
           (["--shard-index", "2", "--num-shards", "2"], "--shard-index 2 must be in"),
           (["--threshold", "1.5"], "--threshold 1.5"), (["--bands", "0"], "--bands 0"),
           (["--ngram", "0"], "--ngram 0"), (["--num-perm", "1"], "--num-perm 1")]
    for flags, message in bad:
        with pytest.raises(ConfigError, match=message):
            _cli(["--input", str(corpus), "--output", str(tmp_path / "bad"), *flags])


def test_bad_records_and_reused_ids(tmp_path):
    rng = random.Random(5)
    texts = [_doc(rng) for _ in range(4)]
    lines = [json.dumps({"id": "a", "text": texts[0]}), "{not json", json.dumps({"id": "b", "text": texts[1]}),
             json.dumps({"id": "a", "text": texts[2]}), json.dumps({"id": "c"}), json.dumps({"id": "d", "text": texts[3]})]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"c.jsonl:2"):
        run_dedup([str(corpus)], str(tmp_path / "strict"), progress=False)
    (tmp_path / "c2.jsonl").write_text("\n".join(lines[:1] + lines[2:4]) + "\n", encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"id 'a' is used by input records #1 and #3"):
        run_dedup([str(tmp_path / "c2.jsonl")], str(tmp_path / "ids"), progress=False)

    whole = run_dedup([str(corpus)], str(tmp_path / "skip"), skip_bad_records=True, progress=False)
    assert whole["bad_records"]["total"] == 2 and whole["duplicate_ids"] == {"removed": 1, "ids": ["a"]}
    assert [r["id"] for r in _output_records(tmp_path / "skip")] == ["a", "b", "d"]
    sharded = tmp_path / "skip3"
    for index in range(3):
        run_dedup([str(corpus)], str(sharded), shard_index=index, num_shards=3, skip_bad_records=True,
                  progress=False)
    assert run_dedup([str(corpus)], str(sharded), num_shards=3, skip_bad_records=True, progress=False) == whole


def test_input_changed_after_sketching_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    run_dedup([str(corpus)], str(out), shard_index=0, num_shards=1, progress=False)
    records = _corpus()
    records[2]["id"] = "renamed"
    _write(corpus, records)
    with pytest.raises(DataFormatError, match="the input changed after it was sketched"):
        run_dedup([str(corpus)], str(out), num_shards=1, progress=False)
