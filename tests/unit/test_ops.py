"""megalign.ops against independent formulations and against transformers' own implementations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megalign.errors import ConfigError
from megalign.ops import RopeScaling, apply_rotary, cross_entropy, rms_norm, rotary_cos_sin, swiglu
from megalign.ops.rotary import rotary_inv_freq

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64_formula(dtype):
    x = (torch.randn(3, 5, 64, generator=_gen()) * 3 + 1).to(dtype)
    w = (torch.rand(64, generator=_gen(1)) + 0.5).to(dtype)
    out = rms_norm(x, w, 1e-5)
    x64 = x.double()
    expected = w.double() * x64 / x64.norm(dim=-1, keepdim=True) * math.sqrt(64) \
        / torch.sqrt(1 + 1e-5 * 64 / x64.pow(2).sum(-1, keepdim=True))
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=_gen(2)) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(2, 7, 48, generator=_gen(3)).to(dtype) * 10
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)


def test_rms_norm_bf16_input_fp32_weight_returns_input_dtype_and_backprops():
    x = torch.randn(4, 16, generator=_gen()).bfloat16().requires_grad_()
    w = torch.ones(16, requires_grad=True)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and w.grad is not None and w.grad.dtype == torch.float32


def test_rms_norm_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.ones(4))


# --------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_formula_and_transformers_activation(dtype):
    gate = torch.randn(3, 10, 32, generator=_gen()).to(dtype) * 4
    up = torch.randn(3, 10, 32, generator=_gen(1)).to(dtype)
    g64 = gate.double()
    expected = g64 / (1 + torch.exp(-g64)) * up.double()
    out = swiglu(gate, up)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    activations = pytest.importorskip("transformers.activations")
    torch.testing.assert_close(out, activations.ACT2FN["silu"](gate) * up, rtol=0, atol=0)


def test_swiglu_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))


# --------------------------------------------------------------------------- rotary
def _llama3_inv_freq_scalar(head_dim: int, theta: float, s: RopeScaling) -> list:
    """The Llama-3.1 reference (Meta's apply_scaling), one frequency at a time in Python floats."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(freq)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return out


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 8192), RopeScaling(4.0, 2.0, 8.0, 256)])
def test_inv_freq_matches_scalar_formula(scaling):
    got = rotary_inv_freq(128, 500000.0, scaling)
    if scaling is None:
        expected = [1.0 / 500000.0 ** (i / 128) for i in range(0, 128, 2)]
    else:
        expected = _llama3_inv_freq_scalar(128, 500000.0, scaling)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    if scaling is not None:  # the scaling actually changes the low frequencies
        assert got[-1] < rotary_inv_freq(128, 500000.0)[-1] / 2


def _hf_llama_config(head_dim: int, heads: int, theta: float, scaling, max_pos: int = 131072):
    transformers = pytest.importorskip("transformers")
    rope = None if scaling is None else {"rope_type": "llama3", **scaling.to_dict()}
    return transformers.LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads,
                                    rope_theta=theta, rope_scaling=rope, max_position_embeddings=max_pos)


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 8192)])
def test_inv_freq_matches_transformers_rope_init(scaling):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    config = _hf_llama_config(128, 4, 500000.0, scaling)
    kind = "default" if scaling is None else "llama3"
    if kind not in getattr(rope_utils, "ROPE_INIT_FUNCTIONS", {}):
        if kind == "llama3":
            pytest.skip("this transformers has no llama3 rope init function")
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        expected = LlamaRotaryEmbedding(config).inv_freq
    else:
        expected = rope_utils.ROPE_INIT_FUNCTIONS[kind](config, None)[0]
    torch.testing.assert_close(rotary_inv_freq(128, 500000.0, scaling), expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 8192)])
def test_cos_sin_match_transformers_rotary_embedding(dtype, scaling):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = _hf_llama_config(64, 2, 500000.0, scaling)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 100, 9000, 3, 40000, 12]])
    x = torch.zeros(2, 6, 64, dtype=dtype)
    hf_cos, hf_sin = llama.LlamaRotaryEmbedding(config)(x, position_ids)
    cos, sin = rotary_cos_sin(position_ids, 64, 500000.0, scaling, dtype=dtype)
    assert cos.shape == (2, 6, 64) and cos.dtype == dtype
    torch.testing.assert_close(cos, hf_cos, **TOL[dtype])
    torch.testing.assert_close(sin, hf_sin, **TOL[dtype])
    cos1, _ = rotary_cos_sin(6, 64, 500000.0, scaling, dtype=dtype)
    torch.testing.assert_close(cos1, hf_cos[0], **TOL[dtype])


def _rotate_as_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Independent formulation: pair (x[j], x[j + d/2]) is a complex number multiplied by exp(i * pos * f_j)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angles = positions.double()[:, None] * inv_freq.double()  # [seq, half]
    z = z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary_matches_complex_rotation(dtype):
    x = torch.randn(2, 9, 3, 16, generator=_gen()).to(dtype)
    cos, sin = rotary_cos_sin(9, 16, 10000.0, dtype=torch.float32)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    expected = _rotate_as_complex(x, torch.arange(9), rotary_inv_freq(16, 10000.0))
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    # a rotation keeps each pair's norm and position 0 is the identity
    torch.testing.assert_close(out[:, 0], x[:, 0], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary_matches_transformers(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    position_ids = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    cos, sin = rotary_cos_sin(position_ids, 32, 10000.0, dtype=dtype)
    q = torch.randn(2, 5, 4, 32, generator=_gen(1)).to(dtype)  # [batch, seq, heads, head_dim]
    k = torch.randn(2, 5, 2, 32, generator=_gen(2)).to(dtype)
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q, **TOL[dtype])
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k, **TOL[dtype])


def test_relative_positions_only_matter():
    """q.k after rotation depends on the distance only: the property RoPE exists for."""
    q = torch.randn(1, 1, 1, 32, generator=_gen(1)).double()
    k = torch.randn(1, 1, 1, 32, generator=_gen(2)).double()

    def score(pq: int, pk: int) -> float:
        cq, sq = rotary_cos_sin(torch.tensor([pq]), 32, 10000.0, dtype=torch.float64)
        ck, sk = rotary_cos_sin(torch.tensor([pk]), 32, 10000.0, dtype=torch.float64)
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_rotary_shape_errors():
    cos, sin = rotary_cos_sin(4, 8)
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        apply_rotary(torch.randn(4, 8), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rotary(torch.randn(1, 5, 2, 8), cos, sin)
    with pytest.raises(ValueError, match="even"):
        rotary_cos_sin(4, 7)
    with pytest.raises(ValueError, match="integer tensor"):
        rotary_cos_sin(torch.tensor([0.5, 1.0]), 8)


@pytest.mark.parametrize("kwargs, field", [
    (dict(factor=0.5), "rope_scaling.factor"),
    (dict(low_freq_factor=-1.0), "rope_scaling.low_freq_factor"),
    (dict(low_freq_factor=4.0, high_freq_factor=4.0), "rope_scaling.high_freq_factor"),
    (dict(original_max_position_embeddings=0), "rope_scaling.original_max_position_embeddings"),
])
def test_rope_scaling_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RopeScaling(**kwargs)


# --------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch_with_ignore_index(dtype, reduction):
    logits = (torch.randn(3, 7, 50, generator=_gen()) * 5).to(dtype)
    labels = torch.randint(0, 50, (3, 7), generator=_gen(1))
    labels[0, :3] = -100
    labels[2, 6] = -100
    out = cross_entropy(logits, labels, reduction=reduction)
    expected = F.cross_entropy(logits.double().reshape(-1, 50), labels.reshape(-1), ignore_index=-100,
                               reduction=reduction)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double().reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def test_cross_entropy_gradient_matches_torch_and_custom_ignore_index():
    logits = torch.randn(10, 30, generator=_gen(), dtype=torch.float64)
    labels = torch.randint(0, 30, (10,), generator=_gen(1))
    labels[::3] = 7
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    cross_entropy(a, labels, ignore_index=7).backward()
    F.cross_entropy(b, labels, ignore_index=7).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert a.grad[labels == 7].abs().max() == 0


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-5e4, 0.0, 5e4]])
    labels = torch.tensor([1, 2])
    out = cross_entropy(logits, labels, reduction="none")
    assert torch.isfinite(out).all()
    # fp32 spacing at 1e4 is ~1e-3: the answer is exact to that, where a naive exp() overflows to inf/nan
    torch.testing.assert_close(out, torch.tensor([1.0 + math.log1p(math.exp(-1.0)), 0.0]), rtol=0, atol=2e-3)
    assert not torch.isfinite(torch.log(torch.exp(logits).sum(-1))).all()


def test_cross_entropy_all_ignored_mean_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss = cross_entropy(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max() == 0


def test_cross_entropy_errors():
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy(logits, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.tensor([0, 1, 2, 3]), reduction="avg")
    with pytest.raises(ValueError, match="vocabulary dimension"):
        cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, torch.zeros(4))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_fast_path_matches_reference(reduction):
    from megalign.ops.cross_entropy import cross_entropy_reference

    logits = torch.randn(4, 9, 40, generator=_gen(3), dtype=torch.float64) * 3
    labels = torch.randint(0, 40, (4, 9), generator=_gen(4))
    labels[1] = -100
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast, reference = cross_entropy(a, labels, reduction=reduction), cross_entropy_reference(b, labels,
                                                                                            reduction=reduction)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-7)
    fast.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-5, atol=1e-7)
