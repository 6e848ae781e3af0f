"""Import a Megatron-LM / megatron-core GPT checkpoint (LLaMA-style) as a megalign checkpoint at a TP/PP layout.

Reads both Megatron formats at whatever TP/PP they were saved with (megatron_formats.py: ``torch_dist`` and
the legacy ``torch`` format, no pickle), infers the :class:`ModelConfig` from the saved args checked against
the tensor shapes, maps the tensors to megalign's names and writes them with the shared writer
(checkpoint_writer.py), exactly as ``hf-to-megalign`` writes an import: step 0, weights only. Continue with
``megalign train --finetune --load SAVE`` or export with ``megalign convert megalign-to-hf``.

Supported: RMSNorm (also ``--apply-layernorm-1p``), SwiGLU, RoPE (Llama-3.1 ``--use-rope-scaling``, linear
``--rotary-seq-len-interpolation-factor``), grouped-query attention, optional q/k/v bias (Qwen2), tied or
untied embeddings, any ``--kv-channels``. Anything else (LayerNorm, learned absolute positions, GELU, linear
biases, MoE, MLA, qk-layernorm, partial or interleaved rotary) is an error naming the setting.

Mapping (per layer ``i``; TE and local layer specs): the fused ``linear_qkv`` holds, per query group ``g``,
``[q heads of g..., k_g, v_g]`` (``head_dim`` rows each) and is split into q/k/v; ``linear_fc1`` is
``[gate; up]``; norms are ``input_layernorm`` / ``linear_qkv.layer_norm_weight`` and ``pre_mlp_layernorm`` /
``linear_fc1.layer_norm_weight``. Memory: one Megatron tensor (a layer's fused QKV, say) at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Container, Dict, Mapping, Optional, Tuple, Union

import torch

from megalign.config.model import ModelConfig, RopeScaling
from megalign.convert.checkpoint_writer import write_checkpoint
from megalign.convert.megatron_formats import MegatronCheckpoint, find_iteration, open_megatron
from megalign.errors import ConfigError, DataFormatError
from megalign.model.hf_weights import weight_names

__all__ = ["convert_megatron_to_megalign", "megatron_config", "megatron_name"]

PathLike = Union[str, Path]
_EMBED, _OUTPUT, _FINAL_NORM = (
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "decoder.final_layernorm.weight",
)
_NORMS = {
    "input_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "mlp_norm": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
}
_LEAVES = {
    "o_proj.weight": "self_attention.linear_proj.weight",
    "down_proj.weight": "mlp.linear_fc2.weight",
    "gate_proj.weight": "mlp.linear_fc1.weight",
    "up_proj.weight": "mlp.linear_fc1.weight",
}
_CUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # cut from a fused Megatron tensor
# (args key, value that is unsupported or a test, what megalign needs)
_UNSUPPORTED = (
    ("normalization", lambda v: v not in (None, "RMSNorm"), "RMSNorm (--normalization RMSNorm)"),
    ("position_embedding_type", lambda v: v not in (None, "rope"), "rotary positions (--position-embedding-type rope)"),
    ("swiglu", lambda v: v is False, "a SwiGLU MLP (--swiglu)"),
    ("add_bias_linear", lambda v: v is True, "no linear biases (--disable-bias-linear)"),
    ("num_experts", lambda v: bool(v), "a dense MLP (no --num-experts)"),
    ("multi_latent_attention", lambda v: bool(v), "standard attention (no --multi-latent-attention)"),
    ("qk_layernorm", lambda v: bool(v), "no query/key norm (no --qk-layernorm)"),
    ("rotary_interleaved", lambda v: bool(v), "non-interleaved rotary (no --rotary-interleaved)"),
    ("rotary_percent", lambda v: v not in (None, 1.0), "full rotary (--rotary-percent 1.0)"),
    ("num_layers_per_virtual_pipeline_stage", lambda v: bool(v), "no virtual pipeline stages"),
)


def _arg(args: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = args.get(key)
    return default if value is None else value


def megatron_config(reader: MegatronCheckpoint) -> ModelConfig:
    """The model's :class:`ModelConfig` (``vocab_size`` = the stored embedding rows) from the saved args,
    checked against the tensor shapes; unsupported settings raise ``ConfigError`` naming them."""
    args, where = reader.args, reader.args_file
    if not args:
        raise DataFormatError(
            f"{where}: holds no Megatron-LM 'args'; the converter needs them for the attention heads, query "
            "groups and rotary settings (checkpoints saved by Megatron-LM's training loop record them)"
        )
    for key, bad, needed in _UNSUPPORTED:
        if bad(args.get(key)):
            raise ConfigError(f"{where}: args.{key}={args.get(key)!r} is not supported; megalign needs {needed}")
    names = set(reader.names())
    if _EMBED not in names:
        raise DataFormatError(f"{reader.path}: has no tensor {_EMBED} (not a GPT model checkpoint?)")
    rows, hidden = reader.shape(_EMBED)
    layers = len({n.split(".")[2] for n in names if n.startswith("decoder.layers.")})
    heads = int(_arg(args, "num_attention_heads", 0))
    groups = int(_arg(args, "num_query_groups", heads)) if args.get("group_query_attention") else heads
    kv_channels = int(_arg(args, "kv_channels", hidden // max(heads, 1)))
    ffn = int(_arg(args, "ffn_hidden_size", 4 * hidden))
    scaling = None
    if args.get("use_rope_scaling"):
        scaling = RopeScaling(float(_arg(args, "rope_scaling_factor", 8.0)), 1.0, 4.0, 8192)
    interpolation = args.get("rotary_seq_len_interpolation_factor")
    tied = not args.get("untie_embeddings_and_output_weights", False)
    config = ModelConfig(
        vocab_size=rows,
        hidden_size=int(_arg(args, "hidden_size", hidden)),
        intermediate_size=ffn,
        num_layers=int(_arg(args, "num_layers", layers)),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        max_position_embeddings=int(_arg(args, "max_position_embeddings", _arg(args, "seq_length", 4096))),
        rope_theta=float(_arg(args, "rotary_base", 10000)),
        rope_scaling=scaling,
        rms_norm_eps=float(_arg(args, "norm_epsilon", 1e-5)),
        qkv_bias=bool(args.get("add_qkv_bias", False)),
        tie_word_embeddings=tied,
        init_std=float(_arg(args, "init_method_std", 0.02)),
        kv_channels=None if kv_channels * heads == hidden else kv_channels,
        apply_layernorm_1p=bool(args.get("apply_layernorm_1p", False)),
        attention_dropout=float(_arg(args, "attention_dropout", 0.0)),
        hidden_dropout=float(_arg(args, "hidden_dropout", 0.0)),
        rotary_interpolation_factor=None if interpolation is None else float(interpolation),
    )
    _check_shapes(reader, config, layers, hidden)
    return config


def _check_shapes(reader: MegatronCheckpoint, config: ModelConfig, layers: int, hidden: int) -> None:
    """The args agree with the stored tensors (so that a wrong mapping cannot pass silently)."""
    where = reader.args_file
    if config.hidden_size != hidden or config.num_layers != layers:
        raise DataFormatError(
            f"{where}: args say hidden_size={config.hidden_size}, num_layers={config.num_layers}; the tensors "
            f"hold hidden size {hidden} and {layers} layers"
        )
    d, q, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    expected = {
        "decoder.layers.0.self_attention.linear_qkv.weight": ((q + 2 * kv) * d, hidden),
        "decoder.layers.0.mlp.linear_fc1.weight": (2 * config.intermediate_size, hidden),
        "decoder.layers.0.self_attention.linear_proj.weight": (hidden, q * d),
    }
    for name, shape in expected.items():
        if name not in reader.names():
            raise DataFormatError(f"{reader.path}: has no tensor {name} (not a LLaMA-style GPT checkpoint?)")
        if reader.shape(name) != shape:
            raise DataFormatError(
                f"{reader.path}: tensor {name} has shape {list(reader.shape(name))}; the args (heads {q}, query "
                f"groups {kv}, kv_channels {d}, ffn_hidden_size {config.intermediate_size}) imply {list(shape)}"
            )


def megatron_name(ours: str, present: Container[str]) -> str:
    """The Megatron tensor a megalign tensor ``ours`` is cut from (global layer numbers)."""
    if ours == "embed_tokens.weight":
        return _EMBED
    if ours == "lm_head.weight":
        return _OUTPUT
    if ours == "final_norm.weight":
        return _FINAL_NORM
    _, layer, *rest = ours.split(".")
    prefix, leaf = f"decoder.layers.{layer}.", ".".join(rest)
    if leaf.split(".")[0] in _NORMS:
        options = [prefix + o for o in _NORMS[leaf.split(".")[0]]]
        return next((o for o in options if o in present), options[0])
    if leaf.startswith("attention.") and leaf.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        return prefix + "self_attention.linear_qkv." + leaf.split(".")[-1]
    return prefix + _LEAVES[leaf.split(".", 1)[1]]


class _MegatronSource:
    """megalign-named tensors cut from the Megatron ones (a checkpoint_writer.TensorSource); keeps the last
    Megatron tensor read, so q/k/v (and gate/up) parts cost one read of the fused tensor."""

    def __init__(self, reader: MegatronCheckpoint, config: ModelConfig) -> None:
        self.reader, self.config = reader, config
        self.present = set(reader.names())
        self.sources = {ours: megatron_name(ours, self.present) for ours, _, _ in weight_names(config)}
        self._cached: Tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self.sources[name])

    def _megatron(self, name: str) -> torch.Tensor:
        if self._cached[0] != name:
            self._cached = (None, None)  # free the previous tensor before reading the next
            self._cached = (name, self.reader.read(name))
        tensor = self._cached[1]
        assert tensor is not None
        return tensor

    def whole(self, ours: str) -> torch.Tensor:
        """The whole megalign tensor ``ours`` (a view of the cached Megatron tensor)."""
        tensor = self._megatron(self.sources[ours])
        leaf = ours.split(".")[-2]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            c = self.config
            per_group = c.num_attention_heads // c.num_key_value_heads
            grouped = tensor.reshape(c.num_key_value_heads, (per_group + 2) * c.head_dim, *tensor.shape[1:])
            bounds = {
                "q_proj": (0, per_group),
                "k_proj": (per_group, per_group + 1),
                "v_proj": (per_group + 1, per_group + 2),
            }
            lo, hi = bounds[leaf]
            part = grouped[:, lo * c.head_dim : hi * c.head_dim]
            return part.reshape(-1, *tensor.shape[1:])
        if leaf in ("gate_proj", "up_proj"):
            return tensor.chunk(2, dim=0)[0 if leaf == "gate_proj" else 1]
        return tensor

    def read(self, name: str, axis: Optional[int], start: int, stop: int) -> torch.Tensor:
        if axis is not None and name.split(".")[-2] not in _CUT:  # a 1:1 tensor: read only the part's rows
            return self.reader.read(self.sources[name], axis, start, stop)
        tensor = self.whole(name)
        if axis is not None:
            tensor = tensor.narrow(axis, start, stop - start)
        return tensor.contiguous().clone()

    def release(self) -> None:
        """Unmap the reader's files (the one cached Megatron tensor is a copy, replaced by the next read)."""
        self.reader.release()


def _check_names(reader: MegatronCheckpoint, source: _MegatronSource) -> None:
    """Every tensor the config needs exists with its shape, and every stored tensor is used."""
    missing = sorted({m for m in source.sources.values() if m not in source.present})
    if missing:
        raise DataFormatError(f"{reader.path}: has no tensor {missing[0]}, which the saved args imply")
    used = set(source.sources.values())
    if source.config.tie_word_embeddings:
        used.add(_OUTPUT)  # the last pipeline stage's copy of the tied embedding (legacy format)
    unused = sorted(n for n in source.present - used)
    if unused:
        where = reader.file_of(unused[0]) if hasattr(reader, "file_of") else reader.path
        raise DataFormatError(
            f"{where}: tensor {unused[0]}"
            + (f" (+{len(unused) - 1} more)" if len(unused) > 1 else "")
            + " has no place in a LLaMA-style megalign model (biases, extra norms or experts are not supported)"
        )
    for name in (_EMBED, _OUTPUT):
        if name in used and name in source.present and reader.shape(name)[0] != source.config.vocab_size:
            raise DataFormatError(
                f"{reader.path}: tensor {name} has {reader.shape(name)[0]} rows, {_EMBED} has "
                f"{source.config.vocab_size}"
            )


def convert_megatron_to_megalign(
    load: PathLike,
    save_dir: PathLike,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    step: Optional[int] = None,
    vocab_size: Optional[int] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = print,
) -> Path:
    """Write the Megatron checkpoint ``load`` (latest iteration, or ``step``) as a megalign checkpoint (step 0)
    under ``save_dir``; returns its path. ``vocab_size``: the true vocabulary (rows past it are padding;
    default: the args' ``vocab_size`` if recorded, else every stored row)."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    iteration_dir = find_iteration(load, step)
    reader = open_megatron(iteration_dir)
    try:
        config = megatron_config(reader)
        source = _MegatronSource(reader, config)
        _check_names(reader, source)
        rows = config.vocab_size
        recorded = reader.args.get("vocab_size")
        if vocab_size is not None:
            true, why = vocab_size, "--vocab-size"
        elif isinstance(recorded, int) and not isinstance(recorded, bool):
            true, why = recorded, f"the args' vocab_size ({reader.args_file})"
        else:
            true, why = rows, "every stored row (the args record no vocab_size; pass --vocab-size to mark padding)"
        if isinstance(true, bool) or not isinstance(true, int) or not 0 < true <= rows:
            raise ConfigError(f"--vocab-size {true!r} must be a positive integer no larger than the {rows} stored rows")
        if log is not None:
            log(f"megatron-to-megalign: true vocabulary {true} of {rows} rows, from {why}")
        padded = rows + (-rows % tp)  # the embedding is split over TP: round the rows up to a multiple of it
        extra: Dict[str, Any] = {
            "megatron": {
                "format": reader.format,
                "iteration": reader.iteration if isinstance(reader.iteration, int) else None,
                "source": str(iteration_dir.resolve()),
            },
            "converted_from": str(iteration_dir.resolve()),
        }
        return write_checkpoint(
            save_dir, config, source, tp, pp, padded, true, extra, "megatron-to-megalign", progress=progress
        )
    finally:
        reader.close()
