"""GPTModel against transformers' LlamaForCausalLM / Qwen2ForCausalLM (fp32, CPU), document masking,
the HF weight-name mapping, initialisation and gradients."""
from __future__ import annotations

import math

import pytest
import torch

from megalign.errors import DataFormatError
from megalign.model import (GPTModel, ModelConfig, hf_state_dict_to_megalign, megalign_state_dict_to_hf, preset,
                            to_hf_config)
from megalign.model.attention import document_causal_mask
from megalign.ops import RopeScaling

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "llama": preset("tiny"),
    "qwen2": preset("tiny", qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # Small original context so that all three frequency bands of the Llama-3.1 scaling are exercised.
    "llama3-rope": preset("tiny", rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
}


def _hf_model(config: ModelConfig, attn: str = "eager") -> torch.nn.Module:
    hf = to_hf_config(config)
    if config.qkv_bias:
        cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    else:
        cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = model_cls(cls(**hf, attn_implementation=attn)).eval()
    with torch.no_grad():  # perturb everything (norm weights are 1 and biases 0 at init) so the mapping shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _pair(name: str, attn: str = "eager"):
    config = CONFIGS[name]
    hf = _hf_model(config, attn)
    ours = GPTModel(config).eval()
    ours.load_state_dict(hf_state_dict_to_megalign(hf.state_dict(), config), strict=True)
    return config, hf, ours


def _tokens(config: ModelConfig, batch: int = 2, seq: int = 48) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name):
    config, hf, ours = _pair(name)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours(tokens)
        assert got.shape == (2, 48, config.vocab_size)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        positions = torch.arange(5, 53).expand(2, -1)  # explicit position ids
        torch.testing.assert_close(ours(tokens, position_ids=positions),
                                   hf(input_ids=tokens, position_ids=positions).logits, rtol=0, atol=1e-5)


def test_logits_equal_transformers_sdpa_backend():
    config, hf, ours = _pair("qwen2", attn="sdpa")
    tokens = _tokens(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_loss_equals_transformers(name):
    config, hf, ours = _pair(name)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = hf(input_ids=tokens, labels=tokens).loss  # HF shifts the labels itself
        labels = torch.roll(tokens, -1, dims=1)  # ours are pre-shifted, as GPTDataset gives them
        loss_mask = torch.ones(tokens.shape)
        loss_mask[:, -1] = 0
        torch.testing.assert_close(ours(tokens, labels=labels, loss_mask=loss_mask), expected, rtol=1e-6, atol=1e-6)
        ignored = labels.clone()
        ignored[:, -1] = -100
        torch.testing.assert_close(ours(tokens, labels=ignored), expected, rtol=1e-6, atol=1e-6)


def test_loss_mask_weights_positions():
    config = CONFIGS["llama"]
    torch.manual_seed(0)
    model = GPTModel(config).eval()
    tokens = _tokens(config)
    labels = _tokens(config, seq=48).flip(1)
    mask = (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    with torch.no_grad():
        per_token = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none")
        expected = (per_token * mask.flatten()).sum() / mask.sum()
        torch.testing.assert_close(model(tokens, labels=labels, loss_mask=mask), expected, rtol=1e-6, atol=1e-6)
        assert model(tokens, labels=labels, loss_mask=torch.zeros(tokens.shape)).item() == 0.0


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_document_masking_equals_separate_documents(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = GPTModel(config).eval()
    lengths = [(7, 20, 13), (25, 15)]
    packed, positions, segments, separate = [], [], [], []
    for row in lengths:
        docs = [torch.randint(0, config.vocab_size, (n,)) for n in row]
        packed.append(torch.cat(docs))
        positions.append(torch.cat([torch.arange(n) for n in row]))
        segments.append(torch.cat([torch.full((n,), i) for i, n in enumerate(row)]))
        separate.append(docs)
    packed, positions, segments = torch.stack(packed), torch.stack(positions), torch.stack(segments)
    with torch.no_grad():
        got = model(packed, position_ids=positions, segment_ids=segments)
        for b, docs in enumerate(separate):
            expected = torch.cat([model(doc.unsqueeze(0))[0] for doc in docs])
            torch.testing.assert_close(got[b], expected, rtol=0, atol=1e-5)
        # Without the segment mask the later documents do see the earlier ones.
        leaky = model(packed, position_ids=positions)
        assert not torch.allclose(leaky[0, 7:], got[0, 7:], atol=1e-3)
        torch.testing.assert_close(leaky[0, :7], got[0, :7], rtol=0, atol=1e-5)


def test_document_causal_mask():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
                            dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5) and torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_mapping_round_trip_is_exact(name):
    config = CONFIGS[name]
    hf_sd = _hf_model(config).state_dict()
    ours = hf_state_dict_to_megalign(hf_sd, config)
    back = megalign_state_dict_to_hf(ours, config)
    expected = {k: v for k, v in hf_sd.items()
                if not (config.tie_word_embeddings and k == "lm_head.weight") and not k.endswith("inv_freq")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    model_sd = GPTModel(config).state_dict()
    assert set(ours) == set(model_sd)
    again = hf_state_dict_to_megalign(megalign_state_dict_to_hf(model_sd, config), config)
    assert all(torch.equal(again[k], model_sd[k]) for k in model_sd)
    assert ("lm_head.weight" in ours) == (not config.tie_word_embeddings)


def test_weight_mapping_errors_name_the_tensor():
    config = CONFIGS["llama"]
    sd = megalign_state_dict_to_hf(GPTModel(config).state_dict(), config)
    with pytest.raises(DataFormatError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        hf_state_dict_to_megalign({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, config)
    with pytest.raises(DataFormatError, match="unexpected tensor.*o_proj.bias"):
        hf_state_dict_to_megalign({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, config)
    with pytest.raises(DataFormatError, match=r"model.norm.weight has shape \(32,\).*\(64,\)"):
        hf_state_dict_to_megalign({**sd, "model.norm.weight": torch.ones(32)}, config)


def test_tied_embeddings_share_the_table():
    model = GPTModel(CONFIGS["qwen2"])
    assert model.lm_head is None
    tokens = _tokens(CONFIGS["qwen2"], seq=8)
    model(tokens).sum().backward()
    assert model.embed_tokens.weight.grad is not None
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and any(n.endswith("q_proj.bias") for n in names)


def test_init_std_and_scaled_output_projections():
    config = preset("tiny", hidden_size=256, intermediate_size=512, num_layers=8, num_attention_heads=4,
                    num_key_value_heads=4, init_std=0.05)
    torch.manual_seed(0)
    model = GPTModel(config)
    scaled = config.init_std / math.sqrt(2 * config.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() - scaled) < 0.1 * scaled, name
        else:
            assert abs(p.std().item() - config.init_std) < 0.1 * config.init_std, name


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_gradients_flow_to_every_parameter(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = GPTModel(config)
    tokens = _tokens(config, seq=16)
    segments = (torch.arange(16) >= 9).long().expand(2, -1)
    loss = model(tokens, segment_ids=segments, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(2, 16))
    loss.backward()
    assert math.isfinite(loss.item())
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_bad_inputs_are_clear_errors():
    model = GPTModel(CONFIGS["llama"])
    tokens = _tokens(CONFIGS["llama"], seq=8)
    with pytest.raises(ValueError, match="integer tensor"):
        model(tokens.float())
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model(tokens, segment_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask was given without labels"):
        model(tokens, loss_mask=torch.ones(2, 8))
