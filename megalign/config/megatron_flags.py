"""Megatron-LM's architecture flags mapped onto a :class:`~megalign.config.model.ModelConfig`, and the checks of
the Megatron flags whose other values megalign does not build (docs/configuration.md, "Megatron-LM flags").

The rule for the architecture flags: a flag that is given has Megatron's meaning. A flag that is not given
takes the base model's value when there is one (--model-preset, or the --load checkpoint's model), else
Megatron's default: tied embeddings, dropout 0.1, and -- refused, since megalign does not build them -- a
LayerNorm, learned absolute positions, a GELU MLP and biases in every linear layer. A Megatron script
therefore states ``--normalization RMSNorm --position-embedding-type rope --swiglu --disable-bias-linear``
(the Llama script does), or starts from a preset.
"""

from __future__ import annotations

from typing import Any, Dict, List

from megalign.config.model import RopeScaling
from megalign.config.sections import CheckpointingSection, DataSection, ModelSection, ParallelSection, PrecisionSection
from megalign.errors import ConfigError

__all__ = ["MEGATRON_DROPOUT", "apply_architecture_flags", "check_architecture_flags", "check_unbuilt_flags"]

MEGATRON_DROPOUT = 0.1  # Megatron's --attention-dropout and --hidden-dropout defaults
_ROPE_SCALING_FACTOR = 8.0  # Megatron's --rope-scaling-factor default


def apply_architecture_flags(fields: Dict[str, Any], m: ModelSection, has_base: bool) -> Dict[str, Any]:
    """``fields`` (ModelConfig keyword arguments: the base's with the shape flags applied) with the
    architecture flags applied; ``has_base``: a preset or checkpoint model supplies the values of absent flags."""
    out = dict(fields)
    if m.add_qkv_bias:
        out["qkv_bias"] = True
    elif m.disable_bias_linear or not has_base:
        out["qkv_bias"] = False
    if m.untie_embeddings_and_output_weights:
        out["tie_word_embeddings"] = False
    elif not has_base:
        out["tie_word_embeddings"] = True
    if m.apply_layernorm_1p:
        out["apply_layernorm_1p"] = True
    for dest in ("attention_dropout", "hidden_dropout"):
        value = getattr(m, dest)
        if value is not None:
            out[dest] = value
        elif not has_base:
            out[dest] = MEGATRON_DROPOUT
    if m.rotary_seq_len_interpolation_factor is not None:
        out["rotary_interpolation_factor"] = m.rotary_seq_len_interpolation_factor
    if m.use_rope_scaling:
        factor = m.rope_scaling_factor if m.rope_scaling_factor is not None else _ROPE_SCALING_FACTOR
        out["rope_scaling"] = RopeScaling(factor=factor).to_dict()
    if not has_base and m.group_query_attention and m.num_query_groups is None:
        out["num_key_value_heads"] = 1  # Megatron's --num-query-groups default
    if m.kv_channels is not None:
        # the default head size is stored as None, so that e.g. the Llama script's --kv-channels 128 equals the preset
        out["kv_channels"] = None if m.kv_channels * out["num_attention_heads"] == out["hidden_size"] else m.kv_channels
    return out


def check_architecture_flags(m: ModelSection, has_base: bool) -> None:
    """ConfigError for an architecture flag value megalign does not build, naming the flag, the value and the fix."""
    if m.normalization == "LayerNorm":
        raise ConfigError("--normalization LayerNorm is not built (megalign's norms are RMSNorm); use RMSNorm")
    if m.position_embedding_type not in (None, "rope"):
        raise ConfigError(
            f"--position-embedding-type {m.position_embedding_type} is not built (megalign's positions are rotary "
            "embeddings); use rope"
        )
    if m.rotary_percent != 1.0:
        raise ConfigError(
            f"--rotary-percent {m.rotary_percent:g} is not built (megalign rotates the whole head); use 1.0"
        )
    if m.rope_scaling_factor is not None and not m.use_rope_scaling:
        raise ConfigError("--rope-scaling-factor needs --use-rope-scaling (it is that scaling's factor)")
    for dest in ("attention_dropout", "hidden_dropout"):
        value = getattr(m, dest)
        if value is not None and not value < 1.0:
            raise ConfigError(f"--{dest.replace('_', '-')} {value:g} must be a probability in [0, 1)")
    if has_base:
        return
    if m.num_query_groups is not None and not m.group_query_attention:
        raise ConfigError(
            f"--num-query-groups {m.num_query_groups} needs --group-query-attention (without it Megatron gives "
            "every attention head its own key/value head)"
        )
    missing: List[str] = []
    if m.normalization is None:
        missing.append("a LayerNorm (give --normalization RMSNorm)")
    if m.position_embedding_type is None:
        missing.append("learned absolute positions (give --position-embedding-type rope)")
    if not m.swiglu:
        missing.append("a GELU MLP (give --swiglu)")
    if not (m.disable_bias_linear or m.add_qkv_bias):
        missing.append("biases in every linear layer (give --disable-bias-linear, and --add-qkv-bias for Qwen2)")
    if missing:
        raise ConfigError(
            "without --model-preset the model takes Megatron's defaults for the flags not given, and megalign "
            f"does not build {'; '.join(missing)}; or start from a --model-preset"
        )


def check_unbuilt_flags(
    data: DataSection, precision: PrecisionSection, parallel: ParallelSection, checkpointing: CheckpointingSection
) -> None:
    """ConfigError for the non-model Megatron flags whose given value megalign does not build."""
    if precision.fp8_format is not None:
        raise ConfigError(
            f"--fp8-format {precision.fp8_format}: fp8 training is not built yet; train with --bf16 and drop the "
            "--fp8-* flags"
        )
    for dest, default in (
        ("fp8_amax_history_len", 1),
        ("fp8_amax_compute_algo", "most_recent"),
        ("fp8_param_gather", False),
    ):
        if getattr(precision, dest) != default:
            raise ConfigError(f"--{dest.replace('_', '-')} is only used with --fp8-format; remove it")
    if parallel.context_parallel_size != 1:
        raise ConfigError(
            f"--context-parallel-size {parallel.context_parallel_size}: context parallelism is not built yet; use 1 "
            "(split long sequences with --tensor-model-parallel-size and --sequence-parallel instead)"
        )
    if checkpointing.ckpt_format != "torch_dist":
        raise ConfigError(
            f"--ckpt-format {checkpointing.ckpt_format}: megalign saves and loads only its own sharded, reshardable "
            "format, which plays torch_dist's role (use --ckpt-format torch_dist or drop the flag); convert a "
            "Megatron checkpoint of another format with `megalign convert megatron-to-megalign`"
        )
    if data.tiktoken_pattern is not None and data.tokenizer_type == "TikTokenizer":
        if not str(data.tokenizer_model or "").lower().endswith(".json"):
            raise ConfigError(
                f"--tiktoken-pattern {data.tiktoken_pattern} applies to Megatron's TikTokenizer JSON vocabularies; "
                "a .tiktoken file is always read with Llama-3's pattern, so drop the flag"
            )
    if data.tiktoken_pattern == "v1":
        raise ConfigError(
            "--tiktoken-pattern v1 is not built: megalign's TikTokenizer reads Megatron JSON vocabularies with the "
            "v2 pattern and Llama-3 .tiktoken files with Llama-3's; use v2 or drop the flag"
        )
    if data.mock_data:
        if data.data_path is not None:
            raise ConfigError("--mock-data and --data-path cannot be used together; give only one")
        for dest in ("reset_position_ids", "reset_attention_mask"):
            if getattr(data, dest):
                raise ConfigError(f"--{dest.replace('_', '-')} is not built for --mock-data; remove it")
    gpt2 = data.tokenizer_type == "GPT2BPETokenizer"
    for dest in ("vocab_file", "merge_file"):
        if getattr(data, dest) is not None and not gpt2:
            raise ConfigError(f"--{dest.replace('_', '-')} is only used with --tokenizer-type GPT2BPETokenizer")
