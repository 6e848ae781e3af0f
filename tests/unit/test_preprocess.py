"""preprocess: JSONL -> Megatron .bin/.idx (decodes back, EOD, keys, worker invariance, atomicity, bad input)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import numpy
import pytest
import zstandard

from megalign.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megalign.data.preprocess import output_prefix_for, preprocess
from megalign.data.preprocess_parallel import Job, plan_units, run_units
from megalign.data.tokenizers import build_tokenizer
from megalign.errors import BadRecordError, ConfigError, DataFormatError, TokenizerError

TOKENIZERS = {"sentencepiece": "GPTSentencePieceTokenizer", "hf": "HuggingFaceTokenizer"}


def read_records(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tokens_of(prefix: str) -> List[List[int]]:
    """Every document of a dataset as one list of ids (its sequences concatenated)."""
    dataset = IndexedDataset(prefix)
    return [numpy.concatenate(dataset.document(i) or [numpy.empty(0, dataset.dtype)]).tolist()
            for i in range(dataset.num_documents)]


def dataset_bytes(prefix: str) -> bytes:
    return Path(data_file_path(prefix)).read_bytes() + Path(index_file_path(prefix)).read_bytes()


@pytest.fixture(scope="module")
def tokenizer_models(sentencepiece_model: Path, hf_bpe_tokenizer: Path) -> Dict[str, str]:
    return {"sentencepiece": str(sentencepiece_model), "hf": str(hf_bpe_tokenizer.parent)}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_output_decodes_back_to_the_input(tmp_path: Path, sample_corpus: Path, tokenizer_models: dict,
                                          kind: str) -> None:
    summary = preprocess([str(sample_corpus)], str(tmp_path / "out" / "corpus"), TOKENIZERS[kind],
                         tokenizer_models[kind], append_eod=True, progress=False)
    prefix = str(tmp_path / "out" / "corpus_text_document")
    assert summary.outputs == {"text": prefix} and output_prefix_for(str(tmp_path / "out" / "corpus"), "text") == prefix
    tokenizer = build_tokenizer(TOKENIZERS[kind], tokenizer_models[kind])
    records = read_records(sample_corpus)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == numpy.uint16 and summary.dtype == "uint16"
    assert dataset.num_documents == len(dataset) == len(records) == summary.documents  # one sequence per document
    for record, ids in zip(records, tokens_of(prefix)):
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == record["text"]
    assert summary.tokens["text"] == dataset.num_tokens
    assert summary.input_bytes == sample_corpus.stat().st_size
    assert ("byte-level BPE fast path" in summary.tokenizer) == (kind == "hf")


def test_eod_only_with_flag_and_empty_text_is_an_empty_document(tmp_path: Path) -> None:
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text('{"text": "1 2 3"}\n{"text": ""}\n\n{"text": "4"}\n{"text": "   "}\n')
    plain = preprocess([str(corpus)], str(tmp_path / "plain"), "NullTokenizer", vocab_size=10, progress=False)
    with_eod = preprocess([str(corpus)], str(tmp_path / "eod"), "NullTokenizer", vocab_size=10, append_eod=True,
                          progress=False)
    assert tokens_of(plain.outputs["text"]) == [[1, 2, 3], [], [4], []]
    assert tokens_of(with_eod.outputs["text"]) == [[1, 2, 3, 10], [], [4, 10], []]  # eod = vocab size
    dataset = IndexedDataset(with_eod.outputs["text"])
    # As Megatron: an empty document has no sequence, so samples never see it.
    assert dataset.document_indices.tolist() == [0, 1, 1, 2, 2]
    assert dataset.sequence_lengths.tolist() == [4, 2]
    assert with_eod.documents == 4 and with_eod.empty_documents == {"text": 2}


@pytest.mark.megatron
def test_bytes_equal_megatron_core_builder(tmp_path: Path) -> None:
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    corpus = tmp_path / "ids.jsonl"
    texts = ["5 6 7", "", "8", "9 1 2 3 4", ""]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = preprocess([str(corpus)], str(tmp_path / "ours"), "NullTokenizer", vocab_size=100, append_eod=True,
                      progress=False).outputs["text"]
    reference = str(tmp_path / "megatron_text_document")
    builder = indexed_dataset.IndexedDatasetBuilder(reference + ".bin", dtype=numpy.uint16)
    for text in texts:  # Megatron's Encoder.encode + add_document, without --split-sentences
        ids = [int(t) for t in text.split()]
        lengths = [len(ids)] if ids else []
        if ids:
            ids.append(100)
            lengths[-1] += 1
        builder.add_document(ids, lengths)
    builder.finalize(reference + ".idx")
    assert dataset_bytes(ours) == dataset_bytes(reference)


def test_multiple_json_keys_give_aligned_datasets(tmp_path: Path, tokenizer_models: dict) -> None:
    records = [{"text": f"نص رقم {i}", "aligned_text": f"aligned {i}" * (i % 3), "id": i} for i in range(40)]
    corpus = tmp_path / "pairs.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    summary = preprocess([str(corpus)], str(tmp_path / "pairs"), "HuggingFaceTokenizer", tokenizer_models["hf"],
                         json_keys=["text", "aligned_text"], append_eod=True, progress=False)
    assert set(summary.outputs) == {"text", "aligned_text"}
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_models["hf"])
    for key in ("text", "aligned_text"):
        documents = tokens_of(str(tmp_path / f"pairs_{key}_document"))
        assert len(documents) == len(records)  # document i is record i in every key's dataset
        for record, ids in zip(records, documents):
            assert tokenizer.decode(ids[:-1] if ids else ids) == record[key]
    assert summary.empty_documents == {"text": 0, "aligned_text": 14}


def test_output_is_byte_identical_for_any_worker_count(tmp_path: Path, sample_corpus: Path,
                                                        tokenizer_models: dict) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = sample_corpus.read_bytes()
    (inputs / "a.jsonl").write_bytes(data)
    (inputs / "b.jsonl.gz").write_bytes(gzip.compress(data[: data.index(b"\n", len(data) // 2) + 1]))
    (inputs / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    args = dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_models["hf"], append_eod=True,
                json_keys=["text", "id"], progress=False)
    one = preprocess([str(inputs)], str(tmp_path / "one" / "c"), workers=1, **args)
    # 3 workers, small byte ranges of the plain file and line ranges of the two compressed ones
    three = preprocess([str(inputs / "*.jsonl*")], str(tmp_path / "three" / "c"), workers=3, chunk_bytes=16384,
                       **args)
    for key in ("text", "id"):
        assert dataset_bytes(one.outputs[key]) == dataset_bytes(three.outputs[key])
    assert one.documents == three.documents > 900
    assert sorted(os.listdir(tmp_path / "three")) == sorted(
        f"c_{key}_document.{ext}" for key in ("text", "id") for ext in ("bin", "idx"))


def test_plan_units_cover_every_line_once(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "x" * (i * 37 % 300)}) + "\n" for i in range(500)]
    plain = tmp_path / "p.jsonl"
    plain.write_text("".join(lines))
    packed = tmp_path / "q.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(lines[:101]).encode()))
    units = plan_units([str(plain), str(packed)], workers=3, chunk_bytes=4096, line_counter=lambda paths: [101])
    plain_units = [u for u in units if not u.by_lines]
    assert len(plain_units) > 10 and [u.index for u in units] == list(range(len(units)))
    assert plain_units[0].start == 0 and plain_units[-1].stop == plain.stat().st_size
    data = plain.read_bytes()
    for left, right in zip(plain_units, plain_units[1:]):
        assert left.stop == right.start and data[right.start - 1 : right.start] == b"\n"
    line_units = [(u.start, u.stop) for u in units if u.by_lines]
    assert line_units == [(0, 33), (33, 67), (67, -1)]
    assert sum(u.weight for u in units) == plain.stat().st_size + packed.stat().st_size


def test_failed_run_keeps_previous_output_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    corpus = tmp_path / "ids.jsonl"
    good = "".join(json.dumps({"text": " ".join(str(j % 50) for j in range(i % 40))}) + "\n" for i in range(2000))
    corpus.write_text(good)
    out = tmp_path / "out"
    first = preprocess([str(corpus)], str(out / "ids"), "NullTokenizer", vocab_size=50, progress=False)
    before = dataset_bytes(first.outputs["text"])
    corpus.write_text(good + '{"text": "1 2"}\n{"text": 3}\n')  # a bad record at line 2002, the very end
    with pytest.raises(BadRecordError, match=rf"^{corpus}:2002: key 'text' holds int, expected a string$"):
        preprocess([str(corpus)], str(out / "ids"), "NullTokenizer", vocab_size=50, workers=2, chunk_bytes=8192,
                   progress=False)
    assert dataset_bytes(first.outputs["text"]) == before
    assert sorted(os.listdir(out)) == ["ids_text_document.bin", "ids_text_document.idx"]


def test_skip_bad_records_counts_them_by_reason(tmp_path: Path) -> None:
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(b'{"text": "1"}\n{"text": \n{"x": "2"}\n{"text": null}\n\xff\xfe\n[3]\n{"text": "4"}\n')
    summary = preprocess([str(corpus)], str(tmp_path / "m"), "NullTokenizer", vocab_size=10, skip_bad_records=True,
                         progress=False)
    assert tokens_of(summary.outputs["text"]) == [[1], [4]]
    assert summary.skipped.counts == {"malformed_json": 1, "missing_key": 1, "non_string_value": 1,
                                      "invalid_utf8": 1, "not_an_object": 1}
    assert [example.split(": ")[0] for example in summary.skipped.examples] == [
        f"{corpus}:{line}" for line in (2, 3, 4, 5, 6)]
    assert "skipped 5 bad records" in summary.report()


def test_input_errors_are_reported_before_anything_is_written(tmp_path: Path) -> None:
    missing = str(tmp_path / "none" / "*.jsonl")
    with pytest.raises(DataFormatError, match="matches no file"):
        preprocess([missing], str(tmp_path / "out" / "x"), "NullTokenizer", vocab_size=10)
    assert not (tmp_path / "out").exists()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "1"}\n')
    with pytest.raises(ConfigError, match="not a directory"):
        preprocess([str(corpus)], str(tmp_path) + os.sep, "NullTokenizer", vocab_size=10)
    with pytest.raises(ConfigError, match="lists a key twice"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer", vocab_size=10, json_keys=["text", "text"])
    with pytest.raises(ConfigError, match="--workers"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer", vocab_size=10, workers=0)
    with pytest.raises(TokenizerError, match="vocab_size"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer")


def test_text_the_tokenizer_refuses_is_named_by_line(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "1 2"}\n\n{"text": "3 word"}\n')
    with pytest.raises(TokenizerError, match=rf"^{corpus}:3: key 'text': NullTokenizer: text must be"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer", vocab_size=10, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_a_worker_that_cannot_start_fails_the_run(tmp_path: Path, sentencepiece_model: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    model = tmp_path / "moved.model"
    shutil.copy(sentencepiece_model, model)
    job = Job("GPTSentencePieceTokenizer", str(model), None, ("text",), False, False, str(tmp_path), "uint16")
    model.unlink()  # the workers cannot load the tokenizer: the run fails instead of hanging
    with pytest.raises(TokenizerError, match="moved.model"):
        run_units(job, [str(corpus)], workers=2, chunk_bytes=None, log_interval=5.0, progress=False)


def test_a_killed_worker_fails_the_run_instead_of_hanging(tmp_path: Path) -> None:
    import signal

    from megalign.data.preprocess_parallel import _WorkerPool

    job = Job("NullTokenizer", None, 10, ("text",), False, False, str(tmp_path), "uint16")
    pool = _WorkerPool(job, 2)
    try:
        os.kill(pool.processes[1].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"exited with code -9 before finishing its work"):
            pool.gather(1, lambda counts: None, lambda event: None)
    finally:
        pool.stop()
    assert not any(process.is_alive() for process in pool.processes)
