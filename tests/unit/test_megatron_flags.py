"""Megatron-LM's own example scripts: every flag parses, is in docs/configuration.md's "Megatron-LM flags" table and
gets its treatment (implemented, checked, no-op); and the model features behind the flags (--kv-channels,
--apply-layernorm-1p, dropout, RoPE interpolation), the mock dataset and Megatron's attention-backend names."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from megalign.config import load_config
from megalign.config.loading import build_parser
from megalign.config.model import RopeScaling, from_hf_config, preset, to_hf_config
from megalign.data.mock_dataset import MockGPTDataset, build_mock_datasets
from megalign.errors import ConfigError
from megalign.model import (
    GPTModel,
    ModelConfig,
    ModelOptions,
    attention_backends,
    hf_state_dict_to_megalign,
    megalign_state_dict_to_hf,
)
from megalign.model.attention_backends import check_attention_backend, dot_product_attention

transformers = pytest.importorskip("transformers")

FLAG_DIR = Path(__file__).resolve().parents[1] / "data" / "megatron_flags"
SCRIPTS = ("train_llama3_8b_h100_fp8", "train_gpt3_175b_distributed")
# The usual Llama / Mistral / Qwen2 model flags beyond the two scripts (--ffn-hidden-size etc. are in them).
EXTRA_FLAGS = (
    "--add-qkv-bias",
    "--rotary-seq-len-interpolation-factor",
    "--use-rope-scaling",
    "--rope-scaling-factor",
    "--norm-epsilon",
    "--tokenizer-type",
    "--data-path",
    "--tokenizer-model",
    "--pipeline-model-parallel-size",
)
# Tiny sizes for the Llama script (its shape is 8B at 8k tokens); --kv-channels 24 != 64 / 4 exercises the option.
TINY = {
    "--num-layers": "2",
    "--hidden-size": "64",
    "--ffn-hidden-size": "128",
    "--num-attention-heads": "4",
    "--num-query-groups": "2",
    "--kv-channels": "24",
    "--seq-length": "32",
    "--max-position-embeddings": "64",
    "--global-batch-size": "4",
    "--train-samples": "40",
    "--lr-decay-samples": "36",
    "--lr-warmup-samples": "8",
    "--vocab-size": "500",
}


def _flags(name: str) -> List[Tuple[str, Optional[str]]]:
    """(flag, value or None) of a script's list; lines starting with # are its header."""
    out = []
    for line in (FLAG_DIR / f"{name}.flags").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            flag, _, value = line.partition(" ")
            out.append((flag, value or None))
    return out


def _argv(
    flags: Sequence[Tuple[str, Optional[str]]], replace: Optional[Dict[str, str]] = None, drop: Sequence[str] = ()
) -> List[str]:
    argv: List[str] = []
    for flag, value in flags:
        if flag in drop or any(flag.startswith(prefix) for prefix in drop if prefix.endswith("-")):
            continue
        value = (replace or {}).get(flag, value)
        argv += [flag] if value is None else [flag, value]
    return argv


def _llama(extra: Sequence[str] = (), drop: Sequence[str] = ()) -> List[str]:
    """The Llama script's flags at tiny sizes, without the fp8 flags (refused) and the profiler, plus ``extra``."""
    return _argv(_flags(SCRIPTS[0]), TINY, ("--fp8-", "--profile", "--profile-") + tuple(drop)) + list(extra)


def _megatron_table() -> str:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    start = docs.index("## Megatron-LM flags")
    return docs[start : docs.index("\n## ", start + 1)]


# ---- (1) parsing, (2) the docs table -------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_flag_parses(name: str) -> None:
    flags = _flags(name)
    assert len(flags) > 30
    try:
        namespace = vars(build_parser().parse_args(_argv(flags)))
    except SystemExit:
        pytest.fail(f"{name}: megalign's parser rejected a flag (see the usage message above)")
    for flag, _ in flags:
        assert flag[2:].replace("-", "_") in namespace, flag


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_flag_is_in_the_docs_table(name: str) -> None:
    rows = [line.split("|")[1] for line in _megatron_table().splitlines() if line.startswith("| `--")]
    documented = {flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row)}
    missing = sorted({flag for flag, _ in _flags(name)} - documented)
    assert not missing, f"docs/configuration.md's Megatron-LM table lacks {missing}"
    assert not sorted(set(EXTRA_FLAGS) - documented)


# ---- (3) the Llama script's config ----------------------------------------------------------------------------
def test_llama_script_stops_at_fp8() -> None:
    with pytest.raises(ConfigError, match=r"--fp8-format hybrid: fp8 training is not built"):
        load_config(_argv(_flags(SCRIPTS[0])))


def test_llama_script_without_fp8_is_llama3_8b(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_config(_argv(_flags(SCRIPTS[0]), drop=("--fp8-",)))
    expected = dataclasses.replace(preset("llama3-8b"), rope_theta=1e6, init_std=0.0134, apply_layernorm_1p=True)
    assert config.model_config(vocab_size=128256) == expected  # GQA 8, SwiGLU 14336, untied, head 128, no biases
    assert config.model_options().attention_backend == "fused"
    assert not config.parallel.sequence_parallel and "--sequence-parallel is disabled" in caplog.text
    assert config.data.mock_data and config.checkpointing.ckpt_format == "torch_dist"


def test_llama_script_tiny_builds_and_trains_a_step() -> None:
    config = load_config(_llama())
    model_config = config.model_config(vocab_size=512)
    assert (model_config.num_key_value_heads, model_config.kv_channels, model_config.head_dim) == (2, 24, 24)
    assert model_config.apply_layernorm_1p and not model_config.tie_word_embeddings and not model_config.qkv_bias
    assert (model_config.attention_dropout, model_config.hidden_dropout) == (0.0, 0.0)
    torch.manual_seed(0)
    model = GPTModel(model_config, options=config.model_options())
    assert model.decoder_layer(0).attention.q_proj.weight.shape == (4 * 24, 64)
    assert torch.equal(model.final_norm.weight, torch.zeros(64))  # 1p: stored as w - 1
    data, _, _ = build_mock_datasets(config.data.split, [4, 0, 0], 32, 501, 500)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("tokens", "labels", "loss_mask")}
    loss = model(**batch)
    loss.backward()
    assert torch.isfinite(loss) and model.final_norm.weight.grad.abs().sum() > 0


def test_llama_script_trains_on_mock_data(tmp_path: Path) -> None:
    from megalign.training.trainer import Trainer

    where = {
        "--save": str(tmp_path / "ckpt"),
        "--load": str(tmp_path / "ckpt"),
        "--tensorboard-dir": str(tmp_path / "tb"),
    }
    argv = _argv(
        _flags(SCRIPTS[0]),
        {**TINY, **where, "--train-samples": "8", "--eval-iters": "1", "--num-workers": "0"},
        ("--fp8-", "--profile", "--profile-", "--lr-decay-samples", "--lr-warmup-samples"),
    )
    result = Trainer(load_config(argv)).train()
    assert result.iteration == 2 and all(torch.isfinite(torch.tensor(loss)) for loss in result.losses.values())


# ---- (4) checked flags: a value megalign does not build stops, naming flag and value --------------------------
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--normalization", "LayerNorm"], r"--normalization LayerNorm is not built.*use RMSNorm"),
        (["--position-embedding-type", "learned_absolute"], r"--position-embedding-type learned_absolute is not built"),
        (["--position-embedding-type", "yarn"], r"--position-embedding-type yarn is not built.*use rope"),
        (["--rotary-percent", "0.5"], r"--rotary-percent 0.5 is not built.*use 1.0"),
        (["--context-parallel-size", "2"], r"--context-parallel-size 2: context parallelism is not built"),
        (["--ckpt-format", "torch"], r"--ckpt-format torch:.*megalign convert megatron-to-megalign"),
        (["--ckpt-format", "zarr"], r"--ckpt-format zarr:.*torch_dist"),
        (["--fp8-format", "e4m3"], r"--fp8-format e4m3: fp8 training is not built"),
        (["--fp8-amax-history-len", "16"], r"--fp8-amax-history-len is only used with --fp8-format"),
        (["--fp8-param-gather"], r"--fp8-param-gather is only used with --fp8-format"),
        (["--tiktoken-pattern", "v1"], r"--tiktoken-pattern v1 is not built"),
        (["--rope-scaling-factor", "4"], r"--rope-scaling-factor needs --use-rope-scaling"),
        (["--attention-dropout", "1.0"], r"--attention-dropout 1 must be a probability"),
        (["--data-path", "prefix"], r"--mock-data and --data-path cannot be used together"),
        (["--vocab-file", "v.json"], r"--vocab-file is only used with --tokenizer-type GPT2BPETokenizer"),
        (["--sft"], r"--mock-data has no conversations for --sft"),
    ],
)
def test_checked_flag_values_stop(extra: List[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_llama(extra))


@pytest.mark.parametrize(
    "dropped, fix",
    [
        ("--normalization", "a LayerNorm (give --normalization RMSNorm)"),
        ("--position-embedding-type", "learned absolute positions (give --position-embedding-type rope)"),
        ("--swiglu", "a GELU MLP (give --swiglu)"),
        ("--disable-bias-linear", "biases in every linear layer (give --disable-bias-linear"),
    ],
)
def test_megatron_defaults_megalign_does_not_build_stop(dropped: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fix)) as info:
        load_config(_llama(drop=(dropped,)))
    assert "without --model-preset" in str(info.value)


def test_gpt3_175b_script_parses_but_names_the_unbuilt_defaults() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_argv(_flags(SCRIPTS[1])))
    message = str(info.value)
    assert all(
        flag in message
        for flag in ("--normalization", "--position-embedding-type", "--swiglu", "--disable-bias-linear")
    )


def test_tokenizer_type_defaults_to_gpt2_with_vocab_and_merge_files() -> None:
    base = [
        "--model-preset",
        "tiny",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--train-iters",
        "1",
        "--lr",
        "1e-3",
    ]
    config = load_config(base + ["--vocab-file", "v.json", "--merge-file", "m.txt"])
    assert config.data.tokenizer_type == "GPT2BPETokenizer"  # pretrain_gpt.py's default
    with pytest.raises(ConfigError, match="--merge-file is only used with --tokenizer-type GPT2BPETokenizer"):
        load_config(base + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--merge-file", "m.txt"])


# ---- the architecture rule: given flags have Megatron's meaning; absent ones the preset's, else Megatron's ------
_PRESETLESS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--vocab-size",
    "100",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "1",
    "--train-iters",
    "1",
    "--lr",
    "1e-3",
    "--swiglu",
    "--normalization",
    "RMSNorm",
    "--position-embedding-type",
    "rope",
    "--disable-bias-linear",
]
_PRESET = [
    "--model-preset",
    "tiny",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "1",
    "--train-iters",
    "1",
    "--lr",
    "1e-3",
]


def test_presetless_model_takes_megatron_defaults() -> None:
    model = load_config(_PRESETLESS).model_config()
    assert model.tie_word_embeddings and (model.attention_dropout, model.hidden_dropout) == (0.1, 0.1)
    assert model.num_key_value_heads == 4 and not model.qkv_bias and model.kv_channels is None
    assert load_config(_PRESETLESS + ["--group-query-attention"]).model_config().num_key_value_heads == 1
    gqa = load_config(_PRESETLESS + ["--group-query-attention", "--num-query-groups", "2"]).model_config()
    assert gqa.num_key_value_heads == 2
    with pytest.raises(ConfigError, match="--num-query-groups 2 needs --group-query-attention"):
        load_config(_PRESETLESS + ["--num-query-groups", "2"])
    qwen = [a for a in _PRESETLESS if a != "--disable-bias-linear"] + ["--add-qkv-bias"]
    assert load_config(qwen).model_config().qkv_bias


def test_preset_decides_unless_the_flag_is_given() -> None:
    assert load_config(_PRESET).model_config() == preset("tiny")  # dropout 0, untied, no biases
    qwen = ["--model-preset", "qwen2-1.5b"] + _PRESET[2:]
    assert load_config(qwen).model_config().tie_word_embeddings
    assert not load_config(qwen + ["--untie-embeddings-and-output-weights"]).model_config().tie_word_embeddings
    assert not load_config(qwen + ["--disable-bias-linear"]).model_config().qkv_bias
    assert load_config(qwen + ["--disable-bias-linear", "--add-qkv-bias"]).model_config().qkv_bias
    model = load_config(
        _PRESET
        + [
            "--attention-dropout",
            "0.2",
            "--hidden-dropout",
            "0.3",
            "--use-rope-scaling",
            "--rope-scaling-factor",
            "4",
            "--rotary-seq-len-interpolation-factor",
            "2",
            "--kv-channels",
            "16",
            "--apply-layernorm-1p",
        ]
    ).model_config()
    assert (model.attention_dropout, model.hidden_dropout, model.rotary_interpolation_factor) == (0.2, 0.3, 2.0)
    assert model.rope_scaling == RopeScaling(4.0, 1.0, 4.0, 8192) and model.kv_channels is None  # 16 = 64 / 4
    assert model.apply_layernorm_1p


# ---- (5) the model features -----------------------------------------------------------------------------------


def _perturbed(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model


def _tokens(vocab: int = 256, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _hf_llama(config: ModelConfig, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(config), attn_implementation="eager"))
    hf.load_state_dict(megalign_state_dict_to_hf(state, config), strict=True)
    return hf.eval()


@pytest.mark.parametrize(
    "changes",
    [
        dict(kv_channels=24),  # head size != hidden / heads: HF's head_dim
        dict(apply_layernorm_1p=True),  # exported as 1 + w
        dict(rotary_interpolation_factor=4.0),  # HF's linear rope scaling
    ],
)
def test_megatron_model_options_equal_transformers(changes: dict) -> None:
    config = preset("tiny", **changes)
    # HF has no 1p norms: an exported model is a plain one (its weights are 1 + w)
    assert from_hf_config(to_hf_config(config)) == dataclasses.replace(config, apply_layernorm_1p=False)
    torch.manual_seed(0)
    ours = _perturbed(GPTModel(config)).eval()
    hf = _hf_llama(config, ours.state_dict())
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, rtol=0, atol=1e-5)
    back = hf_state_dict_to_megalign(hf.state_dict(), config)  # 1p: (w + 1) - 1, exact up to fp32 rounding
    torch.testing.assert_close(back, ours.state_dict(), rtol=0, atol=1e-7)


def test_layernorm_1p_equals_plain_rmsnorm_with_weight_plus_one() -> None:
    one_p = preset("tiny", apply_layernorm_1p=True)
    torch.manual_seed(0)
    ours = _perturbed(GPTModel(one_p)).eval()
    plain = GPTModel(preset("tiny")).eval()
    state = {name: value + 1 if name.endswith("norm.weight") else value for name, value in ours.state_dict().items()}
    plain.load_state_dict(state)
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(ours(tokens), plain(tokens))


def test_layernorm_1p_and_kv_channels_export_through_the_converter(tmp_path: Path) -> None:
    from megalign.checkpoint.storage import save_checkpoint
    from megalign.convert import convert_megalign_to_hf

    training = load_config(_PRESET + ["--apply-layernorm-1p", "--kv-channels", "24"])
    config = training.model_config(vocab_size=256)
    torch.manual_seed(0)
    ours = _perturbed(GPTModel(config)).eval()
    save_checkpoint(tmp_path / "ckpt", 1, ours.state_dict(), config=training.to_dict(), rng=False)
    out = convert_megalign_to_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="fp32", vocab_size=256, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(hf.state_dict()["model.norm.weight"], ours.final_norm.weight.detach() + 1)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, rtol=0, atol=1e-5)


def _loss_and_grads(
    config: ModelConfig, options: Optional[ModelOptions] = None, train: bool = True, seed: int = 7
) -> Tuple[float, Dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _perturbed(GPTModel(config, options=options or ModelOptions())).train(train)
    tokens = _tokens()
    torch.manual_seed(seed)  # the dropout seed is drawn from the global RNG
    loss = model(tokens, labels=torch.roll(tokens, -1, 1))
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_dropout_zero_keeps_todays_numerics_and_rng() -> None:
    torch.manual_seed(11)
    before = torch.get_rng_state()
    config = preset("tiny", kv_channels=24)
    torch.manual_seed(0)
    model = GPTModel(config).train()
    tokens = _tokens()
    torch.set_rng_state(before)
    model(tokens)
    assert torch.equal(torch.get_rng_state(), before)  # no draw without dropout
    loss, grads = _loss_and_grads(config)
    eval_loss, eval_grads = _loss_and_grads(config, train=False)
    assert loss == eval_loss and all(torch.equal(grads[n], eval_grads[n]) for n in grads)


def test_dropout_changes_training_not_evaluation_and_is_seeded() -> None:
    plain = preset("tiny")
    for changes in (dict(hidden_dropout=0.3), dict(attention_dropout=0.3)):
        config = preset("tiny", **changes)
        loss, grads = _loss_and_grads(config)
        assert loss != _loss_and_grads(plain)[0]
        again, again_grads = _loss_and_grads(config)  # same global seed, same masks
        assert loss == again and all(torch.equal(grads[n], again_grads[n]) for n in grads)
        assert _loss_and_grads(config, seed=8)[0] != loss
        assert _loss_and_grads(config, train=False)[0] == _loss_and_grads(plain, train=False)[0]


@pytest.mark.parametrize(
    "options",
    [
        dict(recompute_granularity="selective"),
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ],
)
def test_recomputation_redraws_the_same_dropout_masks(options: dict) -> None:
    config = preset("tiny", hidden_dropout=0.2, attention_dropout=0.2)
    loss, grads = _loss_and_grads(config)
    loss_r, grads_r = _loss_and_grads(config, ModelOptions(**options))
    assert loss == pytest.approx(loss_r, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-6)


# ---- Megatron's --attention-backend names -----------------------------------------------------------------------
def test_fused_on_cpu_falls_back_to_sdpa_with_one_warning(caplog, monkeypatch) -> None:
    monkeypatch.setattr(attention_backends, "_WARNED", {})
    monkeypatch.setitem(attention_backends._MODULES, "transformer_engine.pytorch", None)
    with caplog.at_level(logging.WARNING, logger="megalign.model.attention_backends"):
        for _ in range(3):
            assert check_attention_backend("fused", torch.device("cpu"), torch.float32) == "sdpa"
    lines = [r for r in caplog.records if "--attention-backend fused" in r.getMessage()]
    assert len(lines) == 1 and "using torch SDPA" in lines[0].getMessage()


@pytest.mark.parametrize("backend", ["unfused", "local", "fused"])
def test_megatron_backend_names_compute_attention(backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, heads, 8, generator=gen) for heads in (4, 2, 2))
    segments = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    for segment_ids in (None, segments):
        expected = dot_product_attention(q, k, v, segment_ids, "sdpa")
        torch.testing.assert_close(dot_product_attention(q, k, v, segment_ids, backend), expected)


# ---- --mock-data ------------------------------------------------------------------------------------------------
def test_mock_dataset_is_megatrons_documents_packed() -> None:
    train, valid, test = build_mock_datasets("99,1,0", [6, 3, 0], 16, 1000, 999)
    assert test is None and len(train) == 6 and len(valid) == 3
    sample = train[0]
    assert {k: v.dtype for k, v in sample.items()} == {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
    }
    first_length = int(train.lengths[0])
    stream = torch.cat([train[i]["tokens"] for i in range(6)])
    expected = list(range(1, first_length)) + [999]  # document 0: 1..n-1, then end-of-document
    assert stream[: len(expected)].tolist() == expected[:96]
    assert torch.equal(train[1]["tokens"][0], train[0]["labels"][-1])  # consecutive windows overlap by one
    assert torch.equal(build_mock_datasets("99,1,0", [6, 3, 0], 16, 1000, 999)[0][5]["tokens"], train[5]["tokens"])
    assert (len(train.lengths), len(valid.lengths)) == (99_000, 1_000)  # --split 99,1,0 of the documents
    assert valid.lengths.tolist() != train.lengths[:1_000].tolist()  # other documents
    masked = MockGPTDataset(1000, 16, 1000, 999, range(0, 1), eod_mask_loss=True)
    item = masked[(int(masked.lengths[0]) - 1) // 16]  # the sample holding the end-of-document token
    assert torch.equal(item["loss_mask"] == 0, item["tokens"] == 999) and (item["tokens"] == 999).any()
    with pytest.raises(IndexError):
        train[6]


def test_generation_of_megatron_options_equals_the_model_forward() -> None:
    """--apply-layernorm-1p and RoPE interpolation run on the model's own cached forward (FastDecoder computes
    neither): greedy tokens equal the uncached forward's argmax continuation."""
    from megalign.data.tokenizers import build_tokenizer
    from megalign.inference.fast_decode import ModelDecoder
    from megalign.inference.generation import GenerationParams, Generator

    config = preset("tiny", apply_layernorm_1p=True, rotary_interpolation_factor=2.0, kv_channels=24)
    torch.manual_seed(0)
    model = _perturbed(GPTModel(config)).eval()
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=255)
    generator = Generator(model, tokenizer)
    assert isinstance(generator.decoder(), ModelDecoder)
    prompt = _tokens(batch=1, seq=6)[0].tolist()
    result = generator.generate([prompt], GenerationParams(max_new_tokens=4, stop_token_ids=()))[0]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert result.token_ids == sequence[6:]
