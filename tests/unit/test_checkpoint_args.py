"""Megatron's checkpoint idioms in `megalign train`: `--save X --load X` on every (re)start, the model built
from the checkpoint's record (`--use-checkpoint-args`, or a `--load` without shape flags), and what every
trainer checkpoint records about its model."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import List

import pytest

from megalign.checkpoint.model_record import TOKENIZER_DIR, read_model_record
from megalign.checkpoint.storage import load_checkpoint
from megalign.config.model import preset
from megalign.convert import convert_hf_to_megalign
from megalign.data.preprocess import preprocess
from megalign.errors import ConfigError, DataFormatError
from megalign.training.checkpoint_args import holds_checkpoint, load_training_config
from megalign.training.trainer import train


def _argv(prefix: str, model: Path, cache: Path, *extra: str) -> List[str]:
    return ["--seq-length", "32", "--micro-batch-size", "4", "--data-path", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
            "--data-cache-path", str(cache), "--split", "90,10,0", "--lr", "1e-3", "--eval-iters", "0",
            "--seed", "5", *extra]


def test_save_and_load_the_same_folder_starts_then_resumes(data_prefix: str, sentencepiece_model: Path,
                                                           tmp_path: Path) -> None:
    """Megatron's scripts pass --save X --load X on every start: the first finds nothing and starts from scratch
    (one log line), a restart resumes where the last checkpoint stopped, exactly like an uninterrupted run."""
    ckpt = str(tmp_path / "ckpt")
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "c", "--model-preset", "tiny",
                 "--save", ckpt, "--load", ckpt, "--save-interval", "2")
    assert not holds_checkpoint(ckpt)
    log = io.StringIO()
    first = train(load_training_config([*argv, "--train-iters", "4"]), stream=log, stop_after=2)
    assert f"--load {ckpt}: no checkpoint there yet; training starts from scratch" in log.getvalue()
    assert first.iteration == 2 and holds_checkpoint(ckpt)
    log = io.StringIO()
    resumed = train(load_training_config([*argv, "--train-iters", "4"]), stream=log)
    assert "resumed at step 2" in log.getvalue() and sorted(resumed.losses) == [3, 4]
    straight = train(load_training_config(_argv(data_prefix, sentencepiece_model, tmp_path / "c",
                                                "--model-preset", "tiny", "--train-iters", "4")),
                     stream=io.StringIO())
    assert [resumed.losses[s] for s in (3, 4)] == pytest.approx([straight.losses[s] for s in (3, 4)], rel=1e-6)


def test_a_load_folder_of_only_invalid_checkpoints_stays_an_error(data_prefix: str, sentencepiece_model: Path,
                                                                 tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "c", "--model-preset", "tiny", "--train-iters", "2",
                 "--save", str(ckpt))
    train(load_training_config(argv), stream=io.StringIO())
    (ckpt / "iter_0000002" / "metadata.json").write_text("{ truncated", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no valid checkpoint found"):
        train(load_training_config([*argv, "--load", str(ckpt)]), stream=io.StringIO())


def test_finetune_from_an_empty_folder_is_an_error(data_prefix: str, sentencepiece_model: Path,
                                                   tmp_path: Path) -> None:
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "c", "--model-preset", "tiny", "--train-iters", "2",
                 "--load", str(tmp_path / "empty"), "--finetune")
    with pytest.raises(DataFormatError, match="holds no checkpoint; --finetune needs one"):
        train(load_training_config(argv), stream=io.StringIO())


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, tiny_llama_hf) -> Path:
    """The tiny Llama (vocabulary 1000, hidden 64) imported at TP1: a checkpoint that records its model."""
    path = tmp_path_factory.mktemp("imported") / "ckpt"
    convert_hf_to_megalign(tiny_llama_hf[1], path, progress=False)
    return path


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path, tiny_llama_hf) -> str:
    """The sample corpus tokenized with the imported model's Hugging Face tokenizer."""
    out = tmp_path_factory.mktemp("hf_data")
    preprocess([str(sample_corpus)], str(out / "s"), "HuggingFaceTokenizer", str(tiny_llama_hf[1]), append_eod=True,
               progress=False)
    return str(out / "s_text_document")


def _hf_argv(prefix: str, cache: Path, *extra: str) -> List[str]:
    return ["--seq-length", "32", "--micro-batch-size", "4", "--data-path", prefix, "--data-cache-path", str(cache),
            "--split", "90,10,0", "--lr", "1e-3", "--eval-iters", "0", "--train-iters", "2", *extra]


def test_use_checkpoint_args_builds_the_model_from_the_record(imported: Path, hf_data: str, tmp_path: Path) -> None:
    """No shape flags and no tokenizer flags: the architecture and the tokenizer come from the checkpoint."""
    with load_checkpoint(imported) as checkpoint:
        assert checkpoint.extra["tokenizer"] == {"type": "HuggingFaceTokenizer", "model": "tokenizer", "size": 1000}
        assert checkpoint.extra["vocab"] == {"true_size": 1000, "padded_rows": 1024}
    config = load_training_config(_hf_argv(hf_data, tmp_path / "c", "--load", str(imported), "--finetune",
                                           "--use-checkpoint-args"))
    expected = preset("tiny", vocab_size=1024, rope_theta=500000.0, true_vocab_size=1000)
    assert config.model_config() == expected
    log = io.StringIO()
    result = train(load_training_config(_hf_argv(hf_data, tmp_path / "c", "--load", str(imported), "--finetune",
                                                 "--save", str(tmp_path / "out"))), stream=log)
    assert "loaded weights from" in log.getvalue() and f"{imported / TOKENIZER_DIR}" in log.getvalue()
    assert "1000 tokens; the checkpoint's vocabulary of 1000 padded to 1024 rows" in log.getvalue()
    assert result.iteration == 2


@pytest.mark.parametrize(("flag", "value", "stored"), [("--hidden-size", "32", "64"), ("--num-layers", "3", "2"),
                                                       ("--rotary-base", "10000", "500000.0")])
def test_a_shape_flag_that_disagrees_with_the_checkpoint_names_both_values(imported: Path, hf_data: str,
                                                                           tmp_path: Path, flag: str, value: str,
                                                                           stored: str) -> None:
    argv = _hf_argv(hf_data, tmp_path / "c", "--load", str(imported), "--finetune", "--use-checkpoint-args",
                    flag, value)
    with pytest.raises(ConfigError, match=rf"{flag} {value}\S* disagrees with the --load checkpoint, which has "
                                          rf"{stored}"):
        load_training_config(argv)


@pytest.mark.parametrize(("flags", "named"), [(["--add-qkv-bias"], "--add-qkv-bias / --disable-bias-linear"),
                                              (["--kv-channels", "8"], "--kv-channels"),
                                              (["--apply-layernorm-1p"], "--apply-layernorm-1p")])
def test_an_architecture_flag_that_disagrees_with_the_checkpoint_is_named(imported: Path, hf_data: str,
                                                                          tmp_path: Path, flags: List[str],
                                                                          named: str) -> None:
    argv = _hf_argv(hf_data, tmp_path / "c", "--load", str(imported), "--finetune", "--use-checkpoint-args", *flags)
    with pytest.raises(ConfigError, match=rf"{named} \(gives .*\) disagrees with the --load checkpoint"):
        load_training_config(argv)


def test_agreeing_flags_and_weight_free_settings_are_accepted(imported: Path, hf_data: str, tmp_path: Path) -> None:
    """Megatron's scripts repeat the shape (accepted when it agrees) and pass settings that change no weight."""
    config = load_training_config(_hf_argv(
        hf_data, tmp_path / "c", "--load", str(imported), "--finetune", "--use-checkpoint-args", "--num-layers", "2",
        "--vocab-size", "1000", "--kv-channels", "16", "--disable-bias-linear", "--init-method-std", "0.0134",
        "--max-position-embeddings", "128", "--attention-dropout", "0.1"))
    model = config.model_config()
    assert (model.num_layers, model.max_position_embeddings, model.attention_dropout) == (2, 128, 0.1)


def test_use_checkpoint_args_needs_load(hf_data: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--use-checkpoint-args needs --load"):
        load_training_config(_hf_argv(hf_data, tmp_path / "c", "--model-preset", "tiny", "--use-checkpoint-args"))


def test_a_tokenizer_larger_than_the_checkpoint_vocabulary_names_both_sizes(imported: Path, data_prefix: str,
                                                                           sentencepiece_model: Path,
                                                                           tmp_path: Path) -> None:
    """The imported model has 1000 tokens; a tokenizer of more cannot feed it (one of fewer is fine: Qwen2)."""
    small = tmp_path / "small"
    shutil.copytree(imported, small)
    metadata_path = small / "iter_0000000" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["extra"]["hf"]["vocab_size"] = 900  # pretend the model's vocabulary is 900 tokens
    metadata["config"]["model_config"]["true_vocab_size"] = 900
    metadata["extra"]["vocab"] = {"true_size": 900, "padded_rows": 1024}
    metadata_path.write_text(json.dumps(metadata))
    argv = _argv(data_prefix, sentencepiece_model, tmp_path / "c", "--train-iters", "2", "--load", str(small),
                 "--finetune")
    with pytest.raises(ConfigError, match=r"has 1000 tokens, more than the vocabulary of 900 .* \(1024 rows\)"):
        train(load_training_config(argv), stream=io.StringIO())


def test_trainer_checkpoints_record_the_model_and_carry_the_tokenizer(imported: Path, hf_data: str,
                                                                     tiny_llama_hf, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(load_training_config(_hf_argv(hf_data, tmp_path / "c", "--load", str(imported), "--finetune",
                                        "--save", str(out))), stream=io.StringIO())
    with load_checkpoint(out) as checkpoint:
        assert checkpoint.extra["vocab"] == {"true_size": 1000, "padded_rows": 1024}
        assert checkpoint.extra["tokenizer"]["size"] == 1000
        record = read_model_record(checkpoint)
        assert record.model_config == preset("tiny", vocab_size=1024, rope_theta=500000.0, true_vocab_size=1000)
        assert record.hf["architecture"] == "LlamaForCausalLM" and record.hf["vocab_size"] == 1000
        assert record.tokenizer_dir == out / TOKENIZER_DIR
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / TOKENIZER_DIR / name).read_bytes() == (tiny_llama_hf[1] / name).read_bytes()


def test_a_checkpoint_from_before_the_record_still_reads(data_prefix: str, sentencepiece_model: Path,
                                                        tmp_path: Path) -> None:
    """Older trainer checkpoints hold only the training config, written when a run without a preset meant
    SwiGLU, RMSNorm, RoPE, no biases and untied embeddings (Megatron's defaults for absent flags differ)."""
    out = tmp_path / "out"
    shape = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
             "--disable-bias-linear", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
             "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0"]
    train(load_training_config(_argv(data_prefix, sentencepiece_model, tmp_path / "c", *shape, "--train-iters",
                                     "1", "--save", str(out))), stream=io.StringIO())
    with load_checkpoint(out) as checkpoint:
        expected = read_model_record(checkpoint).model_config
    metadata_path = out / "iter_0000001" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    for key in ("model_config", "vocab", "tokenizer", "hf"):
        metadata["extra"].pop(key, None)
    model = metadata["config"]["model"]
    for key in ("swiglu", "normalization", "position_embedding_type", "disable_bias_linear",
                "untie_embeddings_and_output_weights", "attention_dropout", "hidden_dropout"):
        model.pop(key)
    metadata_path.write_text(json.dumps(metadata))
    with load_checkpoint(out) as checkpoint:
        legacy = read_model_record(checkpoint).model_config
    assert legacy == dataclasses.replace(expected, true_vocab_size=expected.vocab_size)
