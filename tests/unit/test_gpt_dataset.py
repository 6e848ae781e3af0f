"""GPT dataset indices and samples, checked against independent oracles written from the definitions.

The oracles: numpy.random.RandomState for the shuffles, a token-by-token flattening of the documents
for the sample boundaries, and megatron's documented sample semantics for tokens/labels/masks.
(test_megatron_index_equality.py compares with megatron-core itself when it is installed.)
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional

import numpy
import pytest
import torch

from megalign.data import index_helpers
from megalign.data.gpt_dataset import GPTDataset, GPTDatasetConfig, Split, dense_attention_mask
from megalign.data.index_cache import IndexCache
from megalign.data.index_helpers import (
    LegacyRandomState,
    build_gpt_indices,
    build_sample_index,
    plan_gpt_indices,
    summarize_lengths,
)
from megalign.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megalign.errors import ConfigError, DataFormatError

EOD, PAD = 1, 2


def write_corpus(prefix: Path, lengths: List[int], seed: int = 0, pad_every: int = 0) -> List[numpy.ndarray]:
    """Documents of the given lengths (random ids >= 3, each ending with EOD); returns them."""
    rng = numpy.random.default_rng(seed)
    documents = []
    with IndexedDatasetBuilder(str(prefix), numpy.uint16) as builder:
        for i, length in enumerate(lengths):
            document = rng.integers(3, 500, size=length).astype(numpy.uint16)
            if length:
                document[-1] = EOD
            if pad_every and length > 2 and i % pad_every == 0:
                document[0] = PAD
            builder.add_document(document)
            documents.append(document.astype(numpy.int64))
    return documents


def config(**overrides) -> GPTDatasetConfig:
    settings = dict(random_seed=1234, sequence_length=8, blend=(["unused"], None), split="1,0,0", eod_token=EOD, pad_token=PAD)
    settings.update(overrides)
    return GPTDatasetConfig(**settings)


@pytest.fixture()
def corpus(tmp_path: Path):
    lengths = [int(x) for x in numpy.random.default_rng(7).integers(1, 30, size=60)]
    prefix = tmp_path / "corpus_text_document"
    documents = write_corpus(prefix, lengths)
    return str(prefix), IndexedDataset(str(prefix)), documents


# --- numpy RandomState compatibility ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 17, 1000, 65537, 300_001])
@pytest.mark.parametrize("dtype", [numpy.int32, numpy.uint32, numpy.int64])
def test_shuffle_equals_numpy_random_state(seed: int, size: int, dtype) -> None:
    expected = numpy.arange(size, dtype=dtype)
    numpy.random.RandomState(seed).shuffle(expected)
    actual = numpy.arange(size, dtype=dtype)
    LegacyRandomState(seed).shuffle(actual)
    numpy.testing.assert_array_equal(actual, expected)


def test_consecutive_shuffles_share_one_stream() -> None:
    reference, ours = numpy.random.RandomState(99), LegacyRandomState(99)
    for size in (5, 1025, 70_000, 3, 2**16 + 1):
        expected, actual = numpy.arange(size), numpy.arange(size)
        reference.shuffle(expected)
        ours.shuffle(actual)
        numpy.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("maximum", [1, 2, 3, 1000, 2**31, 2**32 - 1, 2**32, 2**40 + 123, 2**63 - 1])
def test_random_interval_equals_numpy_bounded_draws(maximum: int) -> None:
    ours, reference = LegacyRandomState(5), numpy.random.RandomState(5)
    drawn = [ours.random_interval(maximum) for _ in range(64)]
    expected = [int(reference.randint(0, maximum + 1, dtype=numpy.uint64)) for _ in range(64)]
    assert drawn == expected


def test_shuffle_rejects_bad_arrays() -> None:
    with pytest.raises(TypeError):
        LegacyRandomState(0).shuffle(numpy.arange(10).reshape(2, 5))
    frozen = numpy.arange(4)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        LegacyRandomState(0).shuffle(frozen)
    with pytest.raises(ValueError, match="seed"):
        LegacyRandomState(2**32)


# --- index construction against oracles ------------------------------------------------------------


def oracle_document_index(begin: int, end: int, epochs: int, separate: bool, rng: numpy.random.RandomState) -> numpy.ndarray:
    """Megatron's rule: shuffle all epochs together, or the final epoch on its own."""
    documents = numpy.arange(begin, end, dtype=numpy.int32)
    if not separate or epochs == 1:
        index = numpy.tile(documents, epochs)
        rng.shuffle(index)
        return index
    first = numpy.tile(documents, epochs - 1)
    rng.shuffle(first)
    last = documents.copy()
    rng.shuffle(last)
    return numpy.concatenate([first, last])


def oracle_sample_index(lengths: numpy.ndarray, document_index: numpy.ndarray, seq: int, num_samples: int, extra: int) -> numpy.ndarray:
    """Sample k starts at flattened token k * seq: (document-index position, offset) of that token."""
    owner, offset = [], []
    for position, document in enumerate(document_index):
        owner.extend([position] * int(lengths[document]))
        offset.extend(range(int(lengths[document])))
    rows = [(0, 0)]
    for k in range(1, num_samples + 1):
        g = k * seq + extra - 1  # the last token of sample k - 1
        if g < len(owner):
            rows.append((owner[g], offset[g] + 1 - extra))
        else:  # past the data (a partial final sample): pinned to the end of the last document
            rows.append((len(document_index) - 1, int(lengths[document_index[-1]]) - extra))
    return numpy.array(rows)


@pytest.mark.parametrize(
    "num_samples, seq, extra, drop_last",
    [(None, 8, True, True), (None, 5, False, True), (None, 7, True, False), (40, 8, True, True), (180, 8, True, True), (300, 6, False, True)],
)
def test_indices_match_oracles(corpus, num_samples: Optional[int], seq: int, extra: bool, drop_last: bool) -> None:
    _, dataset, _ = corpus
    lengths = numpy.asarray(dataset.sequence_lengths)
    begin, end = 5, 55
    indices = build_gpt_indices(lengths, begin, end, num_samples, seq, 321, extra, drop_last)
    plan = indices.plan
    rng = numpy.random.RandomState(321)
    expected_documents = oracle_document_index(begin, end, plan.num_epochs, plan.separate_final_epoch, rng)
    numpy.testing.assert_array_equal(indices.document_index, expected_documents)
    expected_samples = oracle_sample_index(lengths, expected_documents, seq, plan.num_samples, int(extra))
    numpy.testing.assert_array_equal(indices.sample_index, expected_samples)
    first = numpy.arange(plan.first_shuffle_size, dtype=numpy.uint32)
    rng.shuffle(first)
    second = numpy.arange(plan.first_shuffle_size, plan.num_samples, dtype=numpy.uint32)
    rng.shuffle(second)
    numpy.testing.assert_array_equal(indices.shuffle_index, numpy.concatenate([first, second]))
    assert indices.sample_index.dtype == numpy.int32 and indices.shuffle_index.dtype == numpy.uint32
    if num_samples is not None:
        assert plan.num_samples >= num_samples


def test_sample_index_with_empty_documents_matches_oracle() -> None:
    rng = numpy.random.default_rng(3)
    for _ in range(200):
        lengths = rng.integers(0, 12, size=int(rng.integers(2, 25))).astype(numpy.int32)
        lengths[0] = max(int(lengths[0]), 2)
        document_index = rng.permutation(len(lengths)).astype(numpy.int32)
        seq, extra = int(rng.integers(2, 9)), int(rng.integers(0, 2))
        tokens = int(lengths.sum())
        actual = build_sample_index(lengths, document_index, seq, 1, tokens, True, bool(extra))
        expected = oracle_sample_index(lengths, document_index, seq, (tokens - extra) // seq, extra)
        numpy.testing.assert_array_equal(actual, expected)


def test_plan_separates_final_epoch_below_80_percent() -> None:
    # 1001 tokens per epoch at seq 10 with the extra token: 100 samples per epoch, threshold 80.
    sans = (1 * 1001 - 1) // 10
    separated = plan_gpt_indices(1001, sans + 79, 10, num_documents=7, max_length=500)
    kept = plan_gpt_indices(1001, sans + 80, 10, num_documents=7, max_length=500)
    assert separated.num_epochs == kept.num_epochs == 2
    assert separated.separate_final_epoch and separated.first_shuffle_size == sans
    assert not kept.separate_final_epoch and kept.first_shuffle_size == kept.num_samples
    assert separated.document_index_size == 14
    one_epoch = plan_gpt_indices(1001, None, 10, num_documents=7, max_length=500)
    assert (one_epoch.num_epochs, one_epoch.num_samples, one_epoch.separate_final_epoch) == (1, 100, False)


def test_plan_keeps_megatrons_single_precision_sample_count() -> None:
    # 2**24 + 1 tokens are 2**24 in float32: megatron counts 2**24 partial-sequence samples at seq 1.
    plan = plan_gpt_indices(2**24 + 2, None, 1, num_documents=1, max_length=2**24 + 2, drop_last_partial_sequence=False)
    assert plan.num_samples == 2**24


def test_plan_dtypes_follow_megatron_rules() -> None:
    assert plan_gpt_indices(100, None, 4, 10, max_length=2**31 - 1).sample_index_dtype == numpy.int32
    assert plan_gpt_indices(100, None, 4, 10, max_length=2**31).sample_index_dtype == numpy.int64
    big = plan_gpt_indices(2**33, None, 1, 10, max_length=100)
    assert big.shuffle_index_dtype == numpy.int64
    assert plan_gpt_indices(2**32 - 2, None, 1, 10, max_length=100).shuffle_index_dtype == numpy.uint32


def test_summary_counts_tokens_and_fingerprints_the_range(corpus) -> None:
    _, dataset, documents = corpus
    summary = summarize_lengths(dataset.sequence_lengths, 10, 20)
    assert summary.tokens == sum(len(d) for d in documents[10:20])
    assert summary.max_length == max(len(d) for d in documents)
    changed = numpy.array(dataset.sequence_lengths)
    changed[15] += 1
    assert summarize_lengths(changed, 10, 20).fingerprint != summary.fingerprint
    assert summarize_lengths(changed, 0, 10).fingerprint == summarize_lengths(dataset.sequence_lengths, 0, 10).fingerprint


def test_wrappers_validate_arguments(corpus) -> None:
    _, dataset, _ = corpus
    with pytest.raises(TypeError, match="int32"):
        summarize_lengths(numpy.asarray(dataset.sequence_lengths, dtype=numpy.int64), 0, 5)
    with pytest.raises(ValueError, match="range"):
        summarize_lengths(dataset.sequence_lengths, 5, 1000)
    with pytest.raises(ValueError, match="at least one document"):
        build_gpt_indices(dataset.sequence_lengths, 3, 3, None, 8, 0)
    with pytest.raises(TypeError, match="num_samples"):
        build_gpt_indices(dataset.sequence_lengths, 0, 5, 2.5, 8, 0)


def test_missing_extension_names_the_fix(monkeypatch) -> None:
    def fail(name: str):
        raise ImportError("No module named 'megalign._helpers'")

    monkeypatch.setattr(index_helpers, "_EXTENSION", None)
    monkeypatch.setattr(index_helpers.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"pip install -e \."):
        index_helpers.extension()


# --- samples -------------------------------------------------------------------------------------


def flattened_text(dataset: GPTDataset, documents: List[numpy.ndarray], index: int, pad: int) -> numpy.ndarray:
    """The seq (+1) tokens of a sample, cut from the flattened shuffled documents (the oracle)."""
    flat = numpy.concatenate([documents[d] for d in dataset.document_index])
    extra = int(dataset.config.add_extra_token_to_sequence)
    sample = int(dataset.shuffle_index[index])
    (p0, o0), (p1, o1) = dataset.sample_index[sample], dataset.sample_index[sample + 1]
    starts = numpy.concatenate([[0], numpy.cumsum([len(documents[d]) for d in dataset.document_index])])
    begin, end = starts[p0] + o0, starts[p1] + o1 + extra
    text = flat[begin:end]
    return numpy.concatenate([text, numpy.full(dataset.config.sequence_length + extra - len(text), pad)])


@pytest.mark.parametrize("extra", [True, False])
@pytest.mark.parametrize("split", [Split.train, Split.valid])
def test_samples_are_windows_of_the_flattened_documents(corpus, extra: bool, split: Split) -> None:
    prefix, dataset, documents = corpus
    cfg = config(add_extra_token_to_sequence=extra, drop_last_partial_validation_sequence=False, sequence_length=7)
    gpt = GPTDataset(dataset, prefix, (0, 60), 150, split, cfg, IndexCache(Path(prefix).parent / "cache"))
    seq = cfg.sequence_length
    for index in range(len(gpt)):
        sample = gpt[index]
        text = flattened_text(gpt, documents, index, PAD)
        tokens = text[:seq]
        labels = text[1 : seq + 1] if extra else numpy.concatenate([text[1:seq], [PAD]])
        assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
        numpy.testing.assert_array_equal(sample["tokens"].numpy(), numpy.where(tokens == PAD, 0, tokens))
        numpy.testing.assert_array_equal(sample["labels"].numpy(), numpy.where(labels == PAD, 0, labels))
        numpy.testing.assert_array_equal(sample["loss_mask"].numpy(), (labels != PAD).astype(numpy.float32))
        numpy.testing.assert_array_equal(sample["position_ids"].numpy(), numpy.arange(seq))
    if split == Split.valid:  # the final partial sample is kept and padded
        assert gpt.drop_last_partial_sequence is False
        assert (gpt[int(numpy.argmax(gpt.shuffle_index))]["loss_mask"] == 0).any()


def test_eod_masking_position_reset_and_segments(tmp_path: Path) -> None:
    prefix = tmp_path / "eod_text_document"
    documents = write_corpus(prefix, [3, 4, 2, 6, 5, 3, 4], pad_every=3)
    dataset = IndexedDataset(str(prefix))
    cfg = config(eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True, create_attention_mask=True)
    gpt = GPTDataset(dataset, str(prefix), (0, 7), None, Split.train, cfg, IndexCache(tmp_path / "cache"))
    assert len(gpt) > 0
    for index in range(len(gpt)):
        sample = gpt[index]
        text = flattened_text(gpt, documents, index, PAD)
        tokens, labels = text[:-1], text[1:]
        expected_positions, expected_segments, position, segment = [], [], 0, 0
        for token in tokens:
            expected_positions.append(position)
            expected_segments.append(segment)
            position = 0 if token == EOD else position + 1
            segment += int(token == EOD)
        numpy.testing.assert_array_equal(sample["position_ids"].numpy(), expected_positions)
        numpy.testing.assert_array_equal(sample["segment_ids"].numpy(), expected_segments)
        expected_loss = ((tokens != EOD) & (labels != PAD)).astype(numpy.float32)
        numpy.testing.assert_array_equal(sample["loss_mask"].numpy(), expected_loss)
        segments = numpy.asarray(expected_segments)
        causal = numpy.tril(numpy.ones((8, 8), dtype=bool))
        blocked = ~(causal & (segments[:, None] == segments[None, :]))
        numpy.testing.assert_array_equal(sample["attention_mask"].numpy(), blocked[None])


def test_dense_mask_without_segments_is_causal() -> None:
    mask = dense_attention_mask(None, 4)
    assert mask.shape == (1, 4, 4)
    assert torch.equal(mask[0], ~torch.ones(4, 4, dtype=torch.bool).tril())


def test_pad_equal_to_eod_is_not_masked(corpus) -> None:
    prefix, dataset, _ = corpus
    with pytest.warns(UserWarning, match="pad_token"):
        gpt = GPTDataset(dataset, prefix, (0, 60), None, Split.train, config(pad_token=EOD), IndexCache(Path(prefix).parent / "c"))
        sample = gpt[0]
    assert sample["loss_mask"].sum() == len(sample["loss_mask"])  # EOD labels keep their loss


def test_len_getitem_bounds_and_pickling(corpus) -> None:
    prefix, dataset, _ = corpus
    gpt = GPTDataset(dataset, prefix, (0, 60), 100, Split.train, config(), IndexCache(Path(prefix).parent / "cache"))
    assert len(gpt) >= 100 and gpt.plan is not None and gpt.plan.num_samples == len(gpt)
    assert torch.equal(gpt[-1]["tokens"], gpt[len(gpt) - 1]["tokens"])
    with pytest.raises(IndexError):
        gpt[len(gpt)]
    clone = pickle.loads(pickle.dumps(gpt))  # DataLoader workers started with spawn
    for index in (0, 17, len(gpt) - 1):
        assert torch.equal(clone[index]["tokens"], gpt[index]["tokens"])


def test_empty_split(corpus) -> None:
    prefix, dataset, _ = corpus
    empty = GPTDataset(dataset, prefix, (30, 30), None, Split.test, config(), IndexCache(Path(prefix).parent / "cache"))
    assert len(empty) == 0
    with pytest.raises(ConfigError, match="split: the test split .* is empty but 5 samples"):
        GPTDataset(dataset, prefix, (30, 30), 5, Split.test, config(), IndexCache(Path(prefix).parent / "cache"))


def test_corrupt_index_read_is_a_data_format_error(corpus) -> None:
    prefix, dataset, _ = corpus
    gpt = GPTDataset(dataset, prefix, (0, 60), None, Split.train, config(), IndexCache(Path(prefix).parent / "cache"))
    gpt.document_index = numpy.full_like(numpy.asarray(gpt.document_index), 10_000)
    gpt._reader = None
    with pytest.raises(DataFormatError, match="sequence id 10000"):
        gpt[0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("random_seed", -1),
        ("random_seed", 2**32),
        ("sequence_length", 0),
        ("eod_token", None),
        ("pad_token", "x"),
        ("eod_mask_loss", 1),
        ("mid_level_dataset_surplus", -0.1),
        ("split", "a,b"),
        ("split", "0,0,0"),
        ("split", "1,2,3,4"),
        ("blend", (["p1", "p2"], [1.0])),
        ("blend", (["p1"], [0.0])),
        ("blend", ([], None)),
        ("path_to_cache", ""),
    ],
)
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"^{field}"):
        config(**{field: value})


def test_config_blend_rules() -> None:
    with pytest.raises(ConfigError, match="^blend: blend and blend_per_split"):
        config(blend_per_split=[(["a"], None), None, None])
    with pytest.raises(ConfigError, match="^split: split applies to blend"):
        config(blend=None, blend_per_split=[(["a"], None), None, None])
    with pytest.raises(ConfigError, match="^blend_per_split: needs 3"):
        config(blend=None, split=None, blend_per_split=[(["a"], None), None])
    with pytest.raises(ConfigError, match="^split: is required"):
        config(split=None)
    with pytest.raises(ConfigError, match="^blend: no data"):
        config(blend=None, split=None)
    ok = config(split="969, 30, 1")
    assert ok.split_matrix is not None and ok.split_matrix[2] is not None
