"""preprocess --sft: conversations -> tokens + loss mask (replies only), record forms, bad records, workers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import numpy
import pytest

from megalign.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megalign.data.jsonl import RecordProblem
from megalign.data.preprocess import preprocess
from megalign.data.sft import (
    check_chat_template,
    conversation_from_record,
    loss_mask_prefix,
    tokenize_conversation,
    tokenize_conversations,
)
from megalign.data.tokenizers import END_OF_TURN, build_tokenizer
from megalign.errors import BadRecordError, ConfigError, TokenizerError

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "ما هي عاصمة السعودية؟"},
    {"role": "assistant", "content": " الرياض هي العاصمة. "},
    {"role": "user", "content": "And in English?"},
    {"role": "assistant", "content": "Riyadh is the capital."},
]
RECORDS = [
    {"messages": CONVERSATION},
    {"prompt": "Rewrite: hello world", "response": "Hello, world."},
    {"prompt": "اكتب جملة", "response": "هذه جملة قصيرة.", "system": "Be brief."},
    {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                  {"role": "assistant", "content": "three"}, {"role": "user", "content": "trailing question"}]},
]


@pytest.fixture(scope="module")
def tokenizers(sentencepiece_model: Path, hf_bpe_tokenizer: Path) -> Dict[str, tuple]:
    """kind -> (tokenizer type, model path) for the fixed-template and the Jinja-template tokenizer."""
    return {"fixed": ("SentencePieceTokenizer", str(sentencepiece_model)),
            "jinja": ("HuggingFaceTokenizer", str(hf_bpe_tokenizer.parent))}


def masked_runs(ids: List[int], mask: List[int]) -> List[List[int]]:
    """The maximal runs of consecutive tokens whose mask is 1."""
    runs: List[List[int]] = []
    previous = 0
    for token, value in zip(ids, mask):
        if value and not previous:
            runs.append([])
        if value:
            runs[-1].append(token)
        previous = value
    return runs


def write_jsonl(path: Path, records: List[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def pair_bytes(prefix: str) -> bytes:
    return b"".join(Path(path(p)).read_bytes() for p in (prefix, loss_mask_prefix(prefix))
                    for path in (data_file_path, index_file_path))


@pytest.mark.parametrize("kind", ["fixed", "jinja"])
def test_loss_mask_covers_exactly_the_assistant_replies(tokenizers: dict, kind: str) -> None:
    tokenizer = build_tokenizer(*tokenizers[kind])
    assert (getattr(tokenizer, "chat_template", None) is not None) == (kind == "jinja")
    ids, mask = tokenize_conversation(tokenizer, CONVERSATION)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    replies = [m["content"].strip() + END_OF_TURN for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in masked_runs(ids, mask)] == replies
    assert ids[0] == tokenizer.bos and mask[0] == 0 and ids.count(tokenizer.bos) == 1
    # the tokens are those of the whole rendered text (BOS added where the text does not start with it)
    whole = tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION))
    assert ids == (whole if whole[0] == tokenizer.bos else [tokenizer.bos] + whole)
    prompt_text = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in prompt_text
    # batching gives the same as one conversation at a time
    batch = tokenize_conversations(tokenizer, [CONVERSATION, RECORDS[3]["messages"], CONVERSATION])
    assert batch[0] == batch[2] == (ids, mask)
    assert batch[1] == tokenize_conversation(tokenizer, RECORDS[3]["messages"])
    assert [tokenizer.decode(run) for run in masked_runs(*batch[1])] == [f"two{END_OF_TURN}", f"three{END_OF_TURN}"]


def test_prompt_response_form_equals_messages_form(tmp_path: Path, tokenizers: dict) -> None:
    assert conversation_from_record({"prompt": "p", "response": "r", "system": "s"}) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    assert conversation_from_record({"prompt": "p", "response": "r", "system": None}) == \
        conversation_from_record({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]})
    short = write_jsonl(tmp_path / "short.jsonl", RECORDS)
    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": conversation_from_record(r)} for r in RECORDS])
    kind, model = tokenizers["jinja"]
    first = preprocess([str(short)], str(tmp_path / "a" / "x"), kind, model, sft=True, progress=False)
    second = preprocess([str(long)], str(tmp_path / "b" / "x"), kind, model, sft=True, progress=False)
    assert pair_bytes(first.outputs["sft"]) == pair_bytes(second.outputs["sft"])


@pytest.mark.parametrize("kind", ["fixed", "jinja"])
def test_preprocess_writes_aligned_tokens_and_mask(tmp_path: Path, tokenizers: dict, kind: str) -> None:
    corpus = write_jsonl(tmp_path / "sft.jsonl", RECORDS)
    summary = preprocess([str(corpus)], str(tmp_path / "out" / "w"), *tokenizers[kind], sft=True, progress=False)
    prefix = str(tmp_path / "out" / "w_sft_document")
    assert summary.outputs == {"sft": prefix} and summary.loss_mask_output == loss_mask_prefix(prefix)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"w_sft_document{suffix}.{ext}" for suffix in ("", "_loss_mask") for ext in ("bin", "idx"))
    tokens, mask = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    assert mask.dtype == numpy.uint8 and tokens.dtype == numpy.uint16
    assert tokens.num_documents == len(tokens) == len(RECORDS) == summary.documents  # one sequence per conversation
    assert tokens.sequence_lengths.tolist() == mask.sequence_lengths.tolist()
    assert mask.document_indices.tolist() == tokens.document_indices.tolist() == list(range(len(RECORDS) + 1))
    tokenizer = build_tokenizer(*tokenizers[kind])
    for index, record in enumerate(RECORDS):
        expected = tokenize_conversation(tokenizer, conversation_from_record(record))
        assert (tokens[index].tolist(), mask[index].tolist()) == (list(expected[0]), list(expected[1]))
    assert summary.loss_tokens == int(sum(int(m.sum()) for m in mask[:])) > 0
    assert summary.tokens == {"sft": tokens.num_tokens}
    report = summary.report()
    assert "4 conversations" in report and "loss mask:" in report and "tokens trained on" in report


def test_output_is_byte_identical_for_one_or_two_workers(tmp_path: Path, tokenizers: dict) -> None:
    records = [RECORDS[i % len(RECORDS)] if i % 5 else {"prompt": f"سؤال رقم {i}", "response": f"جواب {i} " * (i % 7)}
               for i in range(120)]
    corpus = write_jsonl(tmp_path / "sft.jsonl", records)
    kind, model = tokenizers["jinja"]
    one = preprocess([str(corpus)], str(tmp_path / "one" / "w"), kind, model, sft=True, workers=1, progress=False)
    two = preprocess([str(corpus)], str(tmp_path / "two" / "w"), kind, model, sft=True, workers=2, chunk_bytes=4096,
                     progress=False)
    assert pair_bytes(one.outputs["sft"]) == pair_bytes(two.outputs["sft"])
    assert one.documents == two.documents == 120 and one.loss_tokens == two.loss_tokens


def test_bad_records_name_file_line_and_key(tmp_path: Path, tokenizers: dict) -> None:
    good = {"prompt": "1 2", "response": "3"}
    lines = [
        good,                                                                   # 1
        {"text": "no conversation"},                                            # 2 missing_key
        {"messages": [{"role": "bot", "content": "x"}]},                        # 3 unknown role
        {"messages": [{"role": "user", "content": "x"}]},                       # 4 no assistant turn
        {"prompt": "x", "response": 5},                                         # 5 wrong type
        {"messages": "hello"},                                                  # 6 wrong type
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},  # 7
        '{"prompt": "x", ',                                                     # 8 malformed JSON
        {"prompt": "only a prompt"},                                            # 9 missing response
        good,                                                                   # 10
    ]
    corpus = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(BadRecordError, match=rf"^{corpus}:2: missing key 'messages'"):
        preprocess([str(corpus)], str(tmp_path / "x"), *tokenizers["fixed"], sft=True, progress=False)
    expected = {2: "missing key 'messages' (or 'prompt' and 'response')",
                3: "key 'messages': message 0 has role 'bot'",
                4: "key 'messages' has no assistant message",
                5: "key 'response' holds int, expected a string",
                6: "key 'messages' holds str",
                7: "key 'messages': message 0 'content' holds null",
                9: "missing key 'response'"}
    for line, detail in expected.items():  # each bad line stops the run at its own FILE:LINE
        single = write_jsonl(tmp_path / f"bad{line}.jsonl", [good] * (line - 1) + [lines[line - 1]])
        with pytest.raises(BadRecordError) as caught:
            preprocess([str(single)], str(tmp_path / "x"), *tokenizers["fixed"], sft=True, progress=False)
        assert str(caught.value).startswith(f"{single}:{line}: {detail}"), str(caught.value)


def test_skipped_bad_records_are_counted(tmp_path: Path, tokenizers: dict) -> None:
    corpus = write_jsonl(tmp_path / "bad.jsonl", [
        RECORDS[1], {"text": "x"}, {"messages": [{"role": "user", "content": "x"}]}, {"prompt": "x", "response": 5},
        '{"prompt": ', RECORDS[2]])
    summary = preprocess([str(corpus)], str(tmp_path / "o"), *tokenizers["fixed"], sft=True, skip_bad_records=True,
                         progress=False)
    assert summary.documents == 2 and len(IndexedDataset(summary.outputs["sft"])) == 2
    assert summary.skipped.counts == {"missing_key": 1, "invalid_conversation": 1, "non_string_value": 1,
                                      "malformed_json": 1}
    assert [example.split(": ")[0] for example in summary.skipped.examples] == [f"{corpus}:{n}" for n in (2, 3, 4, 5)]


def test_flag_conflicts_and_tokenizers_without_a_usable_template(tmp_path: Path, hf_bpe_tokenizer: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", RECORDS[1:2])
    with pytest.raises(ConfigError, match="--json-keys cannot be used with --sft"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer", vocab_size=10, sft=True, json_keys=["text"])
    with pytest.raises(ConfigError, match="--append-eod cannot be used with --sft"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer", vocab_size=10, sft=True, append_eod=True)
    with pytest.raises(TokenizerError, match="--sft needs a tokenizer with a chat template.*NullTokenizer"):
        preprocess([str(corpus)], str(tmp_path / "x"), "NullTokenizer", vocab_size=10, sft=True)
    # a Jinja template that marks only the last message cannot be cut into prompt / reply segments
    folder = tmp_path / "odd_template"
    shutil.copytree(hf_bpe_tokenizer.parent, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{% if loop.last %}[END]{% endif %}\n{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(folder))
    with pytest.raises(TokenizerError, match=rf"HuggingFaceTokenizer '{folder}'.*prefixes of the whole conversation"):
        check_chat_template(tokenizer)
    with pytest.raises(TokenizerError, match="at assistant message 2"):
        tokenize_conversation(tokenizer, CONVERSATION)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "odd_template"]  # nothing written


def test_record_problems_carry_reasons() -> None:
    cases = [({"messages": [], "prompt": "x"}, "invalid_conversation"),
             ({"messages": [{"content": "x"}]}, "missing_key"),
             ({"messages": [1]}, "invalid_conversation"),
             ({"prompt": "\ud800", "response": "x"}, "invalid_utf8"),
             ({"prompt": "x", "response": "y", "system": 3}, "non_string_value")]
    for record, reason in cases:
        with pytest.raises(RecordProblem) as caught:
            conversation_from_record(record)
        assert caught.value.reason == reason
