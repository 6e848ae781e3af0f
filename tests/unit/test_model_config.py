"""ModelConfig: validation, presets against transformers' own models, counts, HF config.json mapping."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megalign.errors import ConfigError
from megalign.model import PRESETS, ModelConfig, flops_per_token, from_hf_config, parameter_count, preset, to_hf_config
from megalign.ops import RopeScaling

# Published sizes (model cards / safetensors index totals).
PUBLISHED = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "qwen2-1.5b": 1_543_714_304,
             "qwen2-7b": 7_615_616_512}


def _hf_model_parameter_count(hf: dict) -> int:
    transformers = pytest.importorskip("transformers")
    if hf["architectures"] == ["LlamaForCausalLM"]:
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    else:
        config_cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    with torch.device("meta"):
        model = model_cls(config_cls(**hf))
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_equals_transformers_model(name):
    config = PRESETS[name]
    assert parameter_count(config) == _hf_model_parameter_count(to_hf_config(config))


@pytest.mark.parametrize("changes", [dict(kv_channels=24), dict(kv_channels=24, qkv_bias=True)])
def test_parameter_count_with_kv_channels_equals_transformers_model(changes):
    config = preset("tiny", **changes)
    assert parameter_count(config) == _hf_model_parameter_count(to_hf_config(config))


@pytest.mark.parametrize("name, count", sorted(PUBLISHED.items()))
def test_presets_have_published_sizes(name, count):
    assert parameter_count(PRESETS[name]) == count


def test_small_presets_sizes():
    assert 80_000 <= parameter_count(PRESETS["tiny"]) <= 150_000
    assert 1_000_000 <= parameter_count(PRESETS["small"]) <= 10_000_000


def test_flops_per_token_formula():
    c = PRESETS["llama3-8b"]
    n = 8_030_261_248 - 128256 * 4096  # the input embedding is a lookup, not a matmul
    assert flops_per_token(c, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    tied = PRESETS["qwen2-1.5b"]  # tied: the one table is the LM head's matmul
    assert flops_per_token(tied, 2048) == 6 * 1_543_714_304 + 12 * 28 * 1536 * 2048
    assert flops_per_token(c, 8192) - flops_per_token(c, 4096) == 12 * 32 * 4096 * 4096
    with pytest.raises(ConfigError, match="seq_length"):
        flops_per_token(c, 0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name):
    config = PRESETS[name]
    hf = to_hf_config(config)
    assert from_hf_config(hf) == config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_from_hf_config_reads_transformers_saved_configs():
    """transformers' own to_dict (rope_parameters in v5, rope_scaling before) maps back to the same config."""
    transformers = pytest.importorskip("transformers")
    for name in ("llama3.1-8b", "qwen2-7b", "tiny"):
        config = PRESETS[name]
        hf = to_hf_config(config)
        cls = transformers.LlamaConfig if config.architecture == "LlamaForCausalLM" else transformers.Qwen2Config
        assert from_hf_config(cls(**hf).to_dict()) == config


def test_published_llama31_config_json():
    """The config.json of meta-llama/Llama-3.1-8B (as published, the keys that matter)."""
    hf = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
          "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
          "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
          "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
          "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
    assert from_hf_config(hf) == PRESETS["llama3.1-8b"]


def test_architecture_follows_qkv_bias():
    assert to_hf_config(PRESETS["llama3-8b"])["architectures"] == ["LlamaForCausalLM"]
    assert to_hf_config(PRESETS["qwen2-7b"])["architectures"] == ["Qwen2ForCausalLM"]
    with pytest.raises(ConfigError, match="qkv_bias"):
        to_hf_config(PRESETS["qwen2-7b"], "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="qkv_bias"):
        to_hf_config(PRESETS["llama3-8b"], "Qwen2ForCausalLM")
    with pytest.raises(ConfigError, match="architecture"):
        to_hf_config(PRESETS["tiny"], "GPT2LMHeadModel")


def _tiny(**changes):
    return dataclasses.replace(PRESETS["tiny"], **changes)


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=60, num_attention_heads=4, num_key_value_heads=4), "hidden_size"),  # head_dim 15 is odd
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(intermediate_size=1.5), "intermediate_size"),
    (dict(max_position_embeddings=True), "max_position_embeddings"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(init_std=0), "init_std"),
    (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(rope_scaling={"factor": 8}), "rope_scaling"),
])
def test_bad_config_names_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        _tiny(**changes)


def test_from_dict_and_preset_errors():
    with pytest.raises(ConfigError, match="num_heads"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "num_heads": 4})
    with pytest.raises(ConfigError, match="rope_scaling.high_freq_factor"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0}})
    with pytest.raises(ConfigError, match="llama3-8b"):
        preset("llama-8b")
    assert preset("tiny", vocab_size=512).vocab_size == 512
    assert preset("tiny") == PRESETS["tiny"]


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(head_dim=31), "head size 31"),  # rotary needs even heads
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
     "original_max_position_embeddings"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_from_hf_config_errors_name_key(changes, field):
    hf = {**to_hf_config(PRESETS["tiny"]), **changes}
    with pytest.raises(ConfigError, match=field):
        from_hf_config(hf)


def test_hf_head_dim_and_linear_rope_are_megatron_options():
    """HF's head_dim other than hidden / heads is --kv-channels; rope_type linear is
    --rotary-seq-len-interpolation-factor."""
    hf = {**to_hf_config(PRESETS["tiny"]), "head_dim": 32, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    config = from_hf_config(hf)
    assert (config.kv_channels, config.head_dim, config.attention_size) == (32, 32, 128)
    assert config.rotary_interpolation_factor == 2.0 and config.rope_scaling is None
    assert to_hf_config(config)["head_dim"] == 32 and to_hf_config(config)["rope_scaling"]["rope_type"] == "linear"
    assert from_hf_config({**to_hf_config(PRESETS["tiny"]), "head_dim": 16}).kv_channels is None  # = 64 / 4
    both = preset("tiny", rotary_interpolation_factor=2.0, rope_scaling=RopeScaling())
    with pytest.raises(ConfigError, match="--use-rope-scaling and --rotary-seq-len-interpolation-factor"):
        to_hf_config(both)
    with pytest.raises(ConfigError, match="attention_dropout=1.0 must be a probability"):
        preset("tiny", attention_dropout=1.0)
    with pytest.raises(ConfigError, match="kv_channels=0"):
        preset("tiny", kv_channels=0)


def test_from_hf_config_missing_keys_and_qwen_sliding_window():
    hf = to_hf_config(PRESETS["tiny"])
    del hf["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        from_hf_config(hf)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_config({**to_hf_config(PRESETS["qwen2-7b"]), "use_sliding_window": True})


def test_head_dim_and_defaults():
    c = PRESETS["llama3-70b"]
    assert c.head_dim == 128 and c.num_attention_heads // c.num_key_value_heads == 8
    assert PRESETS["llama3.1-8b"].rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4}
    c = from_hf_config(hf)
    assert c.num_key_value_heads == 4 and c.rope_theta == 10000.0 and c.rope_scaling is None
