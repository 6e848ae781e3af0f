"""Stage records: ids, shard selection, complete-input checks, and the exactly-once resumable shard output."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from megalign.align.records import StageInput, text_id
from megalign.align.stage_output import ShardOutput, read_manifest
from megalign.errors import BadRecordError, ConfigError, DataFormatError


def _write(path: Path, records, compress: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_ids_given_or_hashed_and_shards_partition_the_input(tmp_path):
    _write(tmp_path / "a.jsonl", [{"id": 7, "text": "سبعة"}, {"text": "no id"}, {"id": "x", "text": "x", "k": 1}])
    _write(tmp_path / "b.jsonl.gz", [{"text": f"doc {i}"} for i in range(5)], compress=True)
    everything = list(StageInput([str(tmp_path)]))
    assert [r["id"] for r in everything[:3]] == ["7", text_id("no id"), "x"]
    assert everything[2]["k"] == 1 and len(everything) == 8
    shards = [list(StageInput([str(tmp_path)], i, 3)) for i in range(3)]
    assert [len(s) for s in shards] == [3, 3, 2]
    assert sorted(r["id"] for s in shards for r in s) == sorted(r["id"] for r in everything)
    assert [r["id"] for r in shards[1]] == [everything[k]["id"] for k in (1, 4, 7)]
    assert StageInput([str(tmp_path)], 1, 3).count() == 3


def test_bad_ids_duplicates_and_shard_flags(tmp_path):
    _write(tmp_path / "dup.jsonl", [{"id": "a", "text": "1"}, {"id": "a", "text": "2"}])
    with pytest.raises(BadRecordError, match=r"dup.jsonl:2: id 'a' repeats the record at .*dup.jsonl:1"):
        list(StageInput([str(tmp_path / "dup.jsonl")]))
    assert len(list(StageInput([str(tmp_path / "dup.jsonl")], duplicate_ids="keep"))) == 2
    _write(tmp_path / "bad.jsonl", [{"id": [1], "text": "t"}, {"text": 3}, {"id": "ok", "text": "fine"}])
    with pytest.raises(BadRecordError, match=r"bad.jsonl:1: field 'id'"):
        list(StageInput([str(tmp_path / "bad.jsonl")]))
    stage = StageInput([str(tmp_path / "bad.jsonl")], skip_bad_records=True)
    assert [r["id"] for r in stage] == ["ok"] and stage.stats.total == 2
    with pytest.raises(ConfigError, match="--shard-index 3 must be in"):
        StageInput([str(tmp_path)], 3, 3)


def _records(n: int, status: str = "rewritten"):
    return [{"id": f"r{i}", "text": f"text {i}", "status": status} for i in range(n)]


def test_shard_output_resumes_exactly_once_after_a_torn_line(tmp_path):
    out = tmp_path / "out"
    with ShardOutput(out, "rewrite", 0, 2, {"model": "m"}) as shard:
        for record in _records(3):
            shard.write(record)
    partial = out / "part-00000-of-00002.jsonl.partial"
    with open(partial, "ab") as handle:  # a crash in the middle of a line
        handle.write(b'{"id": "r3", "te')
    assert read_manifest(out)["missing_shards"] == [0, 1]

    shard = ShardOutput(out, "rewrite", 0, 2, {"model": "m"}).open()
    assert shard.resumed == 3 and shard.is_done("r2") and not shard.is_done("r3")
    for record in _records(5)[3:]:
        shard.write(record)
    with pytest.raises(RuntimeError, match="written twice"):
        shard.write(_records(1)[0])
    summary = shard.finish({"note": 1})
    assert summary["records"] == 5 and summary["statuses"] == {"rewritten": 5}
    lines = (out / "part-00000-of-00002.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in range(5)]
    assert not partial.exists()
    manifest = read_manifest(out)
    assert manifest["finished_shards"] == [0] and manifest["missing_shards"] == [1]
    with pytest.raises(DataFormatError, match="has not finished shards 1 of 2"):
        StageInput([str(out)])

    with ShardOutput(out, "rewrite", 1, 2, {"model": "m"}) as other:
        other.write({"id": "s0", "text": "t", "status": "dropped"})
        other.finish()
    manifest = read_manifest(out)
    assert manifest["missing_shards"] == [] and manifest["statuses"] == {"rewritten": 5, "dropped": 1}
    assert len(list(StageInput([str(out)]))) == 6

    again = ShardOutput(out, "rewrite", 0, 2, {"model": "m"}).open()
    assert again.already_finished and len(again.done_ids) == 5


def test_shard_output_refuses_other_settings_stage_or_shard_count(tmp_path):
    out = tmp_path / "out"
    ShardOutput(out, "rewrite", 0, 1, {"model": "m", "temperature": 0.0}).open().close()
    with pytest.raises(ConfigError, match="temperature: 0.0 then 0.7"):
        ShardOutput(out, "rewrite", 0, 1, {"model": "m", "temperature": 0.7}).open()
    with pytest.raises(ConfigError, match="stage 'rewrite' with 1 shards"):
        ShardOutput(out, "annotate", 0, 1, {}).open()
    with pytest.raises(ConfigError, match="stage 'rewrite' with 1 shards"):
        ShardOutput(out, "rewrite", 0, 2, {"model": "m", "temperature": 0.0}).open()


def test_shard_output_rejects_a_modified_file(tmp_path):
    out = tmp_path / "out"
    with ShardOutput(out, "annotate", 0, 1) as shard:
        shard.write({"id": "a", "text": "t"})
    partial = out / "part-00000-of-00001.jsonl.partial"
    partial.write_text(partial.read_text() + "not json\n")
    with pytest.raises(DataFormatError, match=r"jsonl.partial:2: not a record this stage wrote"):
        ShardOutput(out, "annotate", 0, 1).open()
