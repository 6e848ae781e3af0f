"""Name mapping between Hugging Face LLaMA/Qwen2 state dicts and :class:`~megalign.model.decoder.GPTModel`'s,
for tensor-parallel size 1 (whole tensors; the converter for any parallel layout builds on this).

Tensors are passed through unchanged (same objects, dtypes and layouts: both use ``[out, in]``), except the
norm weights of a model with ``apply_layernorm_1p`` (stored as ``w - 1``): :func:`hf_norm_weight` and
:func:`megalign_norm_weight` convert them to and from HF's plain scale. With tied embeddings the LM head is
the embedding table: HF's ``lm_head.weight`` is ignored on the way in and not written on the way out (as
``save_pretrained`` does).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from megalign.config.model import ModelConfig
from megalign.errors import DataFormatError

__all__ = [
    "hf_norm_weight",
    "hf_state_dict_to_megalign",
    "megalign_norm_weight",
    "megalign_state_dict_to_hf",
    "weight_names",
]

_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer recomputed from the config


def weight_names(config: ModelConfig) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """``(megalign name, HF name, shape)`` for every tensor of a model of ``config``'s shape."""
    h, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv, q = config.num_key_value_heads * config.head_dim, config.attention_size
    names: List[Tuple[str, str, Tuple[int, ...]]] = [("embed_tokens.weight", "model.embed_tokens.weight", (vocab, h))]
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names += [(ours + "input_norm.weight", hf + "input_layernorm.weight", (h,))]
        for proj, out in (("q", q), ("k", kv), ("v", kv)):
            names.append((f"{ours}attention.{proj}_proj.weight", f"{hf}self_attn.{proj}_proj.weight", (out, h)))
            if config.qkv_bias:
                names.append((f"{ours}attention.{proj}_proj.bias", f"{hf}self_attn.{proj}_proj.bias", (out,)))
        names += [
            (ours + "attention.o_proj.weight", hf + "self_attn.o_proj.weight", (h, q)),
            (ours + "mlp_norm.weight", hf + "post_attention_layernorm.weight", (h,)),
            (ours + "mlp.gate_proj.weight", hf + "mlp.gate_proj.weight", (ffn, h)),
            (ours + "mlp.up_proj.weight", hf + "mlp.up_proj.weight", (ffn, h)),
            (ours + "mlp.down_proj.weight", hf + "mlp.down_proj.weight", (h, ffn)),
        ]
    names.append(("final_norm.weight", "model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", (vocab, h)))
    return names


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")  # megalign's input_norm/mlp_norm/final_norm, HF's *layernorm / model.norm


def hf_norm_weight(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The HF value of megalign tensor ``name``: ``1 + w`` for a norm weight of an ``apply_layernorm_1p`` model
    (added in fp32, returned in the tensor's dtype), else ``tensor`` itself."""
    if not (config.apply_layernorm_1p and _is_norm(name)):
        return tensor
    return (tensor.float() + 1.0).to(tensor.dtype)


def megalign_norm_weight(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`hf_norm_weight` (``name`` is megalign's): ``w - 1`` for a 1p model's norm weight."""
    if not (config.apply_layernorm_1p and _is_norm(name)):
        return tensor
    return (tensor.float() - 1.0).to(tensor.dtype)


def _convert(
    state_dict: Mapping[str, torch.Tensor],
    pairs: List[Tuple[str, str, Tuple[int, ...]]],
    source: str,
    ignored: Tuple[str, ...],
) -> Dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``pairs`` (source name → target name), checking presence and shapes."""
    missing = [src for src, _, _ in pairs if src not in state_dict]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise DataFormatError(f"{source} state dict: missing {len(missing)} tensor(s) the model config needs: {shown}")
    known = {src for src, _, _ in pairs}
    unexpected = sorted(k for k in state_dict if k not in known and not k.endswith(ignored))
    if unexpected:
        raise DataFormatError(
            f"{source} state dict: unexpected tensor(s) {', '.join(unexpected[:5])}; the model "
            f"config does not have them (wrong number of layers, biases or tied embeddings?)"
        )
    out: Dict[str, torch.Tensor] = {}
    for src, dst, shape in pairs:
        tensor = state_dict[src]
        if tuple(tensor.shape) != shape:
            raise DataFormatError(
                f"{source} state dict: {src} has shape {tuple(tensor.shape)}, the model config needs {shape}"
            )
        out[dst] = tensor
    return out


def hf_state_dict_to_megalign(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> Dict[str, torch.Tensor]:
    """A LlamaForCausalLM / Qwen2ForCausalLM state dict renamed for ``GPTModel(config)`` (TP=1).

    Missing, unexpected or wrongly shaped tensors raise ``DataFormatError`` naming them.
    """
    ignored = _IGNORED_HF_SUFFIXES + (("lm_head.weight",) if config.tie_word_embeddings else ())
    pairs = [(hf, ours, shape) for ours, hf, shape in weight_names(config)]
    out = _convert(state_dict, pairs, "Hugging Face", ignored)
    return {name: megalign_norm_weight(name, tensor, config) for name, tensor in out.items()}


def megalign_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> Dict[str, torch.Tensor]:
    """The inverse: a ``GPTModel(config)`` state dict (TP=1) with Hugging Face names."""
    names = weight_names(config)
    out = _convert(state_dict, names, "megalign", ())
    return {hf_name: hf_norm_weight(ours, out[hf_name], config) for ours, hf_name, _ in names}
