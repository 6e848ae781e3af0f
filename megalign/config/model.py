"""Shape and hyper-parameters of a LLaMA-3 / Qwen2 decoder, presets, parameter and FLOP counts, and the
mapping to Hugging Face ``config.json`` (LlamaForCausalLM / Qwen2ForCausalLM).

The two families share one architecture (pre-RMSNorm decoder, grouped-query attention with rotary
embeddings, SwiGLU MLP, no biases); Qwen2 adds biases to the q/k/v projections (``qkv_bias``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional

from megalign.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_BACKENDS",
    "PRESETS",
    "ModelConfig",
    "RopeScaling",
    "ModelOptions",
    "flops_per_token",
    "from_hf_config",
    "parameter_count",
    "preset",
    "to_hf_config",
]

LLAMA = "LlamaForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
ARCHITECTURES = {LLAMA: "llama", QWEN2: "qwen2"}
# --attention-backend: auto picks flash-attn, else Transformer Engine, else torch SDPA; fused is Transformer Engine
# (SDPA where it cannot run), unfused/local the explicit softmax(q k^T) v (model/attention_backends.py).
ATTENTION_BACKENDS = ("auto", "flash", "te", "sdpa", "fused", "unfused", "local")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 ("llama3" rope_type) frequency scaling; Llama-3.1 uses (8, 1, 4, 8192)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"rope_scaling.{name}={value!r} must be a positive number")
        if self.factor < 1:
            raise ConfigError(f"rope_scaling.factor={self.factor} must be >= 1 (it stretches the context)")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must be greater than "
                f"rope_scaling.low_freq_factor={self.low_freq_factor}"
            )
        orig = self.original_max_position_embeddings
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise ConfigError(f"rope_scaling.original_max_position_embeddings={orig!r} must be a positive integer")

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of the four parameters (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder's shape; validated on construction (``ConfigError`` names the field)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # Megatron's --kv-channels: the size of one attention head when it is not hidden_size / num_attention_heads.
    kv_channels: Optional[int] = None
    # Megatron's --apply-layernorm-1p: norm weights are stored as w - 1 (initialised to 0) and applied as 1 + w.
    apply_layernorm_1p: bool = False
    # Megatron's --attention-dropout (on the attention probabilities) and --hidden-dropout (embedding output and
    # the attention / MLP outputs before the residual add); training only.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Megatron's --rotary-seq-len-interpolation-factor: positions are divided by it (linear RoPE interpolation).
    rotary_interpolation_factor: Optional[float] = None
    # Rows at and past this id are vocabulary padding (Megatron's rounding to a multiple of 128 x TP): masked
    # out of the softmax, zero in checkpoints, stripped on export. None: every one of vocab_size rows is real.
    true_vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {name}={value!r} must be a positive integer")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"model config: {name}={value!r} must be a positive number")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"model config: {name}={value!r} must be a probability in [0, 1)")
        kv, factor = self.kv_channels, self.rotary_interpolation_factor
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0):
            raise ConfigError(f"model config: kv_channels={kv!r} must be a positive integer or None")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
            raise ConfigError(f"model config: rotary_interpolation_factor={factor!r} must be a number >= 1 or None")
        for name in ("qkv_bias", "tie_word_embeddings", "apply_layernorm_1p"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model config: {name}={getattr(self, name)!r} must be true or false")
        true = self.true_vocab_size
        bad_true = isinstance(true, bool) or not isinstance(true, int) or not 0 < true <= self.vocab_size
        if true is not None and bad_true:
            raise ConfigError(
                f"model config: true_vocab_size={true!r} must be a positive integer no larger than "
                f"vocab_size={self.vocab_size} (the embedding's rows)"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"model config: rope_scaling={self.rope_scaling!r} must be a RopeScaling or None")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model config: num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model config: the head size {self.head_dim} (kv_channels, else hidden_size / "
                f"num_attention_heads) must be even (rotary embeddings rotate pairs)"
            )

    @property
    def real_vocab_size(self) -> int:
        """Rows that are real tokens (``true_vocab_size``, else every row)."""
        return self.vocab_size if self.true_vocab_size is None else self.true_vocab_size

    @property
    def head_dim(self) -> int:
        """Size of one attention head: ``kv_channels``, else ``hidden_size / num_attention_heads``."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def attention_size(self) -> int:
        """Width of the concatenated query heads (q_proj's output, o_proj's input)."""
        return self.num_attention_heads * self.head_dim

    @property
    def architecture(self) -> str:
        """The Hugging Face class this shape maps to: Qwen2 when q/k/v have biases, else LLaMA."""
        return QWEN2 if self.qkv_bias else LLAMA

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (checkpoint metadata, YAML); inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        kwargs = dict(data)
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = _rope_scaling_from_dict(kwargs["rope_scaling"], "rope_scaling")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"model config: {exc}") from None


@dataclass(frozen=True)
class ModelOptions:
    """How a model runs, not what it computes: attention kernel and activation recomputation.

    ``recompute_granularity``: ``"full"`` recomputes whole layers in the backward pass (``recompute_method``
    ``"uniform"``: every layer, in checkpointed groups of ``recompute_num_layers``; ``"block"``: only the
    first ``recompute_num_layers`` layers, each on its own); ``"selective"`` recomputes only the attention
    core (the ``[seq, seq]`` scores), Megatron's default trade-off. None stores every activation.
    """

    attention_backend: str = "auto"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model options: attention_backend={self.attention_backend!r} must be one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ConfigError(
                f"model options: recompute_granularity={self.recompute_granularity!r} must be full, selective or None"
            )
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                raise ConfigError(
                    f"model options: recompute_method={self.recompute_method!r} must be uniform or "
                    "block with full recomputation"
                )
            n = self.recompute_num_layers
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"model options: recompute_num_layers={n!r} must be a positive integer")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ConfigError(
                "model options: recompute_method and recompute_num_layers are only used with "
                "recompute_granularity='full'"
            )


def _rope_scaling_from_dict(data: Any, where: str) -> RopeScaling:
    if isinstance(data, RopeScaling):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}={data!r} must be a mapping")
    kwargs = {}
    for f in fields(RopeScaling):
        if f.name not in data:
            raise ConfigError(f"{where}.{f.name} is missing")
        kwargs[f.name] = data[f.name]
    return RopeScaling(**kwargs)


PRESETS: Dict[str, ModelConfig] = {
    # Unit tests: ~107k parameters, runs in milliseconds.
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    # CPU demo: ~7M parameters, GQA like the real models.
    "small": ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    # meta-llama/Meta-Llama-3-8B (the AceGPT-v2 / LLaMA3-Tamed base).
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    # meta-llama/Meta-Llama-3-70B.
    "llama3-70b": ModelConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    # meta-llama/Llama-3.1-8B: same weights' shape as llama3-8b, 128k context through rope scaling.
    "llama3.1-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5,
    ),
    # Qwen/Qwen2-1.5B (tied embeddings).
    "qwen2-1.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2-7B.
    "qwen2-7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, optionally with fields replaced (e.g. ``preset("tiny", vocab_size=512)``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    if not overrides:
        return PRESETS[name]
    return ModelConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


def parameter_count(config: ModelConfig) -> int:
    """Exact number of parameters (embeddings, per-layer attention/MLP/norms, final norm, LM head)."""
    h, kv, q = config.hidden_size, config.num_key_value_heads * config.head_dim, config.attention_size
    attention = h * q + 2 * h * kv + q * h  # q, k, v, o
    if config.qkv_bias:
        attention += q + 2 * kv
    mlp = 3 * h * config.intermediate_size  # gate, up, down
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_layers * layer + h


def flops_per_token(config: ModelConfig, seq_length: int) -> int:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT MFU estimate.

    ``6 * N + 12 * num_layers * hidden_size * seq_length`` (PaLM, Chowdhery et al. 2022, appendix B;
    nanoGPT's ``estimate_mfu``): 2 FLOPs per multiply-add and weight in the forward pass and 4 in the
    backward pass give ``6 * N``; the attention scores and the weighted sum of values add
    ``2 * 2 * seq * hidden`` per layer forward, times 3 for training (causal masking not discounted).
    ``N`` counts the weights used in matmuls: all parameters except the input embedding table (a lookup),
    unless it is tied to the LM head.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length <= 0:
        raise ConfigError(f"seq_length={seq_length!r} must be a positive integer")
    n = parameter_count(config)
    if not config.tie_word_embeddings:
        n -= config.vocab_size * config.hidden_size
    return 6 * n + 12 * config.num_layers * config.hidden_size * seq_length


def to_hf_config(config: ModelConfig, architecture: Optional[str] = None) -> Dict[str, Any]:
    """The ``config.json`` dict of the matching Hugging Face model (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``).

    ``architecture`` defaults to ``config.architecture``; LLaMA cannot express q/k/v biases alone
    (its ``attention_bias`` also biases o_proj) and Qwen2 always has them, so a mismatch is an error.
    """
    architecture = architecture or config.architecture
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture={architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    if architecture == LLAMA and config.qkv_bias:
        raise ConfigError("qkv_bias=True cannot be saved as LlamaForCausalLM; use Qwen2ForCausalLM")
    if architecture == QWEN2 and not config.qkv_bias:
        raise ConfigError(
            "qkv_bias=False cannot be saved as Qwen2ForCausalLM (it always has q/k/v biases); use LlamaForCausalLM"
        )
    out: Dict[str, Any] = {
        "architectures": [architecture],
        "model_type": ARCHITECTURES[architecture],
        "vocab_size": config.real_vocab_size,  # the padding rows are not exported
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": _hf_rope_scaling(config),
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.init_std,
        "hidden_act": "silu",
        "attention_dropout": config.attention_dropout,
    }
    if architecture == LLAMA:
        out.update(attention_bias=False, mlp_bias=False, head_dim=config.head_dim)
    else:
        out.update(use_sliding_window=False, max_window_layers=config.num_layers)
        if config.kv_channels is not None:
            out["head_dim"] = config.head_dim
    return out


def _hf_rope_scaling(config: ModelConfig) -> Optional[Dict[str, Any]]:
    """HF's ``rope_scaling``: Llama-3.1's (``llama3``), linear interpolation (``linear``), or None."""
    if config.rope_scaling is not None and config.rotary_interpolation_factor is not None:
        raise ConfigError(
            "rope_scaling and rotary_interpolation_factor (--use-rope-scaling and "
            "--rotary-seq-len-interpolation-factor) together cannot be written as a Hugging Face config"
        )
    if config.rope_scaling is not None:
        return {"rope_type": "llama3", **config.rope_scaling.to_dict()}
    if config.rotary_interpolation_factor is not None:
        return {"rope_type": "linear", "factor": float(config.rotary_interpolation_factor)}
    return None


def _hf_rope(hf: Mapping[str, Any]) -> tuple:
    """(rope_theta, RopeScaling | None) from the old ``rope_scaling`` or the transformers-5 ``rope_parameters``."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, Mapping):
        raise ConfigError(f"HF config: {key}={params!r} must be an object")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, float(params.get("factor", 1.0))
    if rope_type != "llama3":
        raise ConfigError(
            f"HF config: {key}.rope_type={rope_type!r} is not supported (only 'default', 'linear' and 'llama3')"
        )
    scaling = {f.name: params.get(f.name) for f in fields(RopeScaling)}
    if scaling["original_max_position_embeddings"] is None:
        raise ConfigError(f"HF config: {key}.original_max_position_embeddings is missing")
    return theta, _rope_scaling_from_dict(scaling, f"HF config: {key}")


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a LLaMA or Qwen2 ``config.json`` dict; unsupported features are errors."""
    model_type = hf.get("model_type")
    if model_type is None:
        archs = hf.get("architectures") or []
        model_type = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if model_type not in ARCHITECTURES.values():
        raise ConfigError(
            f"HF config: model_type={model_type!r} is not supported; "
            f"use a llama or qwen2 config ({', '.join(ARCHITECTURES)})"
        )
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in hf
    ]
    if missing:
        raise ConfigError(f"HF config: missing key(s) {', '.join(missing)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ConfigError("HF config: mlp_bias=true is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ConfigError("HF config: attention_bias=true is not supported (o_proj bias)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("HF config: use_sliding_window=true is not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    # a head size other than hidden / heads is Megatron's --kv-channels
    kv_channels = head_dim if head_dim is not None and head_dim * heads != hf["hidden_size"] else None
    theta, rope = _hf_rope(hf)
    scaling, interpolation = (None, rope) if isinstance(rope, float) else (rope, None)
    defaults = {"llama": (2048, 1e-6), "qwen2": (32768, 1e-6)}[str(model_type)]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings", defaults[0]),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", defaults[1]),
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
        kv_channels=kv_channels,
        rotary_interpolation_factor=interpolation,
    )
