"""SFTDataset / build_sft_datasets: one conversation per sample, padding, truncation, masks, order, splits."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import List, Tuple

import numpy
import pytest
import torch

from megalign.data.blended_dataset import BlendedDataset
from megalign.data.gpt_dataset import Split
from megalign.data.indexed_dataset import IndexedDatasetBuilder
from megalign.data.sft import loss_mask_prefix
from megalign.data.sft_dataset import SFTDataset, build_sft_datasets, open_sft_pair, truncation_counts
from megalign.errors import ConfigError, DataFormatError

EOD, PAD = 2, 3


def conversation(index: int) -> Tuple[List[int], List[int]]:
    """Conversation `index`: a prompt of 3 + index % 4 tokens then a reply of 2 + index % 3 tokens.

    Token values encode the conversation (1000 * (index + 1) + position), so samples can be traced back.
    """
    prompt, reply = 3 + index % 4, 2 + index % 3
    ids = [1000 * (index + 1) + position for position in range(prompt + reply)]
    return ids, [0] * prompt + [1] * reply


def write_sft(prefix: Path, conversations: List[Tuple[List[int], List[int]]], mask_lengths=None) -> str:
    with IndexedDatasetBuilder(str(prefix), numpy.int32) as tokens, \
            IndexedDatasetBuilder(loss_mask_prefix(str(prefix)), numpy.uint8) as masks:
        for number, (ids, mask) in enumerate(conversations):
            tokens.add_document(ids)
            masks.add_document(mask if mask_lengths is None else mask[: mask_lengths[number]])
    return str(prefix)


@pytest.fixture()
def prefix(tmp_path: Path) -> str:
    return write_sft(tmp_path / "sft_sft_document", [conversation(i) for i in range(20)])


def owner(sample: dict) -> int:
    """The conversation a sample was cut from."""
    return int(sample["tokens"][0]) // 1000 - 1


def test_padding_label_shift_and_loss_mask(prefix: str) -> None:
    dataset = SFTDataset(prefix, seq_length=12, seed=1, eod_token=EOD, pad_token=PAD)
    assert len(dataset) == 20 and dataset.num_truncated == 0
    for index in range(len(dataset)):
        sample = dataset[index]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert [sample[k].dtype for k in ("tokens", "labels", "loss_mask", "position_ids")] == [
            torch.int64, torch.int64, torch.float32, torch.int64]
        assert all(sample[k].shape == (12,) for k in sample)
        ids, mask = conversation(owner(sample))
        window = ids + [PAD] * (13 - len(ids))
        assert sample["tokens"].tolist() == window[:12] and sample["labels"].tolist() == window[1:]
        # the mask of each label: 1 exactly on reply tokens, 0 on the prompt and on padding
        assert sample["loss_mask"].tolist() == (mask + [0] * (13 - len(mask)))[1:]
        assert sample["position_ids"].tolist() == list(range(12))
    assert sorted(owner(dataset[i]) for i in range(20)) == list(range(20))  # one epoch: each conversation once
    default_pad = SFTDataset(prefix, seq_length=12, seed=1, eod_token=EOD)[0]
    assert default_pad["labels"].tolist()[-1] == EOD  # no pad id: padded with eod, still masked


def test_truncation_is_counted(tmp_path: Path) -> None:
    long_prompt = (list(range(100, 110)), [0] * 8 + [1, 1])  # trained tokens beyond an 8-token window
    long_reply = (list(range(200, 212)), [0, 0] + [1] * 10)
    path = write_sft(tmp_path / "t", [conversation(0), long_prompt, long_reply])
    dataset = SFTDataset(path, seq_length=7, seed=0, eod_token=EOD)
    assert (dataset.num_truncated, dataset.num_without_loss, dataset.num_conversations) == (2, 1, 3)
    assert truncation_counts(dataset) == (2, 1, 3) and truncation_counts(None) == (0, 0, 0)
    samples = {int(dataset[i]["tokens"][0]): dataset[i] for i in range(3)}
    cut = samples[200]
    assert cut["tokens"].tolist() == list(range(200, 207)) and cut["labels"].tolist() == list(range(201, 208))
    assert cut["loss_mask"].tolist() == [0.0] + [1.0] * 6
    assert samples[100]["loss_mask"].sum() == 0


def test_order_is_deterministic_and_epochs_reuse_every_conversation(prefix: str) -> None:
    def order(seed: int, num_samples=None) -> List[int]:
        dataset = SFTDataset(prefix, num_samples=num_samples, seq_length=8, seed=seed, eod_token=EOD)
        return [owner(dataset[i]) for i in range(len(dataset))]

    assert order(5) == order(5) and order(5) != order(6) and order(5) != list(range(20))
    many = order(5, num_samples=50)
    assert len(many) == 50 and many[:20] == order(5)
    assert sorted(many[20:40]) == list(range(20)) and many[20:40] != many[:20]  # a fresh permutation per epoch
    assert set(Counter(many).values()) == {2, 3}
    generator = numpy.random.RandomState(5)  # one generator, a permutation per epoch
    expected = numpy.concatenate([generator.permutation(20) for _ in range(3)])[:50]
    assert many == expected.tolist()


def test_splits_are_disjoint_and_cover_the_conversations(prefix: str) -> None:
    train, valid, test = build_sft_datasets(prefix, "6,2,2", [None, None, None], seq_length=8, seed=3,
                                            pad_token=PAD, eod_token=EOD)
    owners = [{owner(d[i]) for i in range(len(d))} for d in (train, valid, test)]
    assert owners == [set(range(12)), set(range(12, 16)), set(range(16, 20))]
    assert [d.index_split for d in (train, valid, test)] == [Split.train, Split.valid, Split.test]
    sized = build_sft_datasets([prefix], "6,2,2", [30, 5, 0], 8, 3, PAD, EOD)
    assert [len(d) for d in sized] == [30, 5, 0]
    assert {owner(sized[0][i]) for i in range(30)} == set(range(12))
    # a split with no share is None; one with a share but no conversations cannot give samples
    assert build_sft_datasets(prefix, "1,0,0", [4, 100, 100], 8, 3, PAD, EOD)[1:] == [None, None]
    tiny = write_sft(Path(prefix).parent / "tiny", [conversation(0), conversation(1)])
    with pytest.raises(ConfigError, match="valid split .* is empty but 2 samples were requested"):
        build_sft_datasets(tiny, "98,1,1", [2, 2, 0], 8, 3, PAD, EOD)
    assert build_sft_datasets(tiny, "98,1,1", [2, 0, 0], 8, 3, PAD, EOD)[1:] == [None, None]


def test_weighted_blend_of_two_prefixes(prefix: str, tmp_path: Path) -> None:
    other = write_sft(tmp_path / "other", [conversation(i) for i in range(50, 60)])
    train, valid, _ = build_sft_datasets(["3", prefix, "1", other], "8,2,0", [40, 8, 0], 8, 7, PAD, EOD)
    assert isinstance(train, BlendedDataset) and len(train) == 40 and len(valid) == 8
    counts = Counter(train[i]["dataset_id"] for i in range(40))
    assert counts == {0: 30, 1: 10}
    assert all(owner(train[i]) >= 50 for i in range(40) if train[i]["dataset_id"] == 1)
    again = build_sft_datasets(([prefix, other], [3.0, 1.0]), "8,2,0", [40, 8, 0], 8, 7, PAD, EOD)[0]
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(40))
    unweighted = build_sft_datasets([prefix, other], "8,2,0", [None, None, None], 8, 7, PAD, EOD)[0]
    assert len(unweighted) == 16 + 8  # one epoch of each, interleaved by their sizes
    assert truncation_counts(unweighted) == (1, 0, 24)  # conversation 11 has 10 tokens > 8 + 1
    loader = torch.utils.data.DataLoader(train, batch_size=4)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, 8) and batch["loss_mask"].dtype == torch.float32


def test_mismatched_or_missing_mask_files_are_data_format_errors(tmp_path: Path) -> None:
    conversations = [conversation(i) for i in range(4)]
    shorter = write_sft(tmp_path / "a", conversations, mask_lengths=[len(c[0]) for c in conversations[:3]] + [2])
    with pytest.raises(DataFormatError, match=rf"{tmp_path / 'a'}.idx and {tmp_path / 'a'}_loss_mask.idx do not belong "
                                              r"together: sequence 3"):
        SFTDataset(shorter, seq_length=8, seed=0, eod_token=EOD)
    fewer = write_sft(tmp_path / "b", conversations)
    with IndexedDatasetBuilder(loss_mask_prefix(fewer), numpy.uint8) as masks:
        masks.add_document([0, 1])
    with pytest.raises(DataFormatError, match="4 vs 1 sequences"):
        open_sft_pair(fewer)
    with IndexedDatasetBuilder(loss_mask_prefix(fewer), numpy.int32) as masks:
        for ids, mask in conversations:
            masks.add_document(mask)
    with pytest.raises(DataFormatError, match="must hold uint8"):
        open_sft_pair(fewer)
    with IndexedDatasetBuilder(loss_mask_prefix(fewer), numpy.uint8) as masks:
        for ids, mask in conversations:
            masks.add_document([2] * len(mask))
    with pytest.raises(DataFormatError, match="must be 0 or 1"):
        open_sft_pair(fewer)
    Path(loss_mask_prefix(fewer) + ".idx").unlink()
    with pytest.raises(DataFormatError, match="needs its loss mask"):
        build_sft_datasets(fewer, "1,0,0", [None, None, None], 8, 0, None, EOD)


def test_argument_checks(prefix: str) -> None:
    with pytest.raises(ConfigError, match="seq_length"):
        SFTDataset(prefix, seq_length=0, seed=0, eod_token=EOD)
    with pytest.raises(ConfigError, match="document_range"):
        SFTDataset(prefix, (5, 40), seq_length=4, seed=0, eod_token=EOD)
    with pytest.raises(ConfigError, match="split"):
        build_sft_datasets(prefix, "a,b", [None, None, None], 8, 0, None, EOD)
    with pytest.raises(ConfigError, match="needs a sample count"):
        build_sft_datasets(["1", prefix, "1", prefix], "1,0,0", [None, None, None], 8, 0, None, EOD)
