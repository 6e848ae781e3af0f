"""Attention backend choice and the flash-attn / Transformer Engine adapters, checked on CPU against SDPA with
stand-in modules that implement the libraries' documented interfaces by explicit loops."""
from __future__ import annotations

import math
import types
from typing import Optional

import pytest
import torch

from megalign.errors import ConfigError
from megalign.model import attention_backends as ab
from megalign.model.attention_backends import (check_attention_backend, cumulative_document_lengths,
                                               dot_product_attention, resolve_attention_backend)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _loop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Reference for one sequence: q [s, h, d], k/v [s, hkv, d], allowed [s, s] (query, key) booleans."""
    seq, heads, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(heads):
        scores = (q[:, h] @ k[:, h // group].T) / math.sqrt(dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, h // group]
    return out


def _fake_flash_module(calls: list) -> types.ModuleType:
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("dense", causal, dropout_p))
        allowed = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
        return torch.stack([_loop_attention(q[b], k[b], v[b], allowed) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("varlen", causal, cu_q.tolist(), max_q))
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        out = torch.empty_like(q)
        for start, stop in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            allowed = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
            out[start:stop] = _loop_attention(q[start:stop], k[start:stop], v[start:stop], allowed)
        return out

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def _fake_te_module(created: list) -> types.ModuleType:
    class DotProductAttention(torch.nn.Module):
        def __init__(self, heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0, qkv_format="sbhd",
                     attn_mask_type="causal"):
            super().__init__()
            created.append((heads, kv_channels, num_gqa_groups, qkv_format, attn_mask_type))
            self.mask_type = attn_mask_type

        def forward(self, q, k, v, attention_mask: Optional[torch.Tensor] = None):
            batch, seq = q.shape[:2]
            outs = []
            for b in range(batch):
                if self.mask_type == "causal":
                    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
                else:  # arbitrary: True marks excluded positions, shape [batch, 1, seq, seq]
                    allowed = ~attention_mask[b, 0]
                outs.append(_loop_attention(q[b], k[b], v[b], allowed))
            return torch.stack(outs).reshape(batch, seq, -1)  # TE returns [b, s, heads * dim] for bshd

    return types.SimpleNamespace(DotProductAttention=DotProductAttention)


def _qkv(seed: int = 0, batch: int = 2, seq: int = 7, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, heads, dim, generator=g), torch.randn(batch, seq, kv_heads, dim, generator=g),
            torch.randn(batch, seq, kv_heads, dim, generator=g))


SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2]])


def test_cumulative_document_lengths() -> None:
    cu, longest = cumulative_document_lengths(SEGMENTS)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 7, 8, 13, 14] and longest == 5
    cu, longest = cumulative_document_lengths(torch.zeros(3, 4, dtype=torch.long))
    assert cu.tolist() == [0, 4, 8, 12] and longest == 4  # a new document at every row start


def test_auto_is_sdpa_on_cpu_and_without_gpu_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "_flash_attn", lambda: None)
    monkeypatch.setattr(ab, "_transformer_engine", lambda: None)
    for device in (CPU, CUDA):
        assert resolve_attention_backend("auto", device, torch.bfloat16) == "sdpa"
    assert check_attention_backend("auto", CPU, torch.float32) == "sdpa"
    assert check_attention_backend("sdpa", CPU, torch.float32) == "sdpa"


def test_auto_prefers_flash_then_te(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "_flash_attn", lambda: _fake_flash_module([]))
    monkeypatch.setattr(ab, "_transformer_engine", lambda: _fake_te_module([]))
    assert resolve_attention_backend("auto", CUDA, torch.bfloat16) == "flash"
    assert resolve_attention_backend("auto", CUDA, torch.float32) == "te"  # flash-attn has no fp32 kernels
    assert resolve_attention_backend("auto", CPU, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(ab, "_flash_attn", lambda: None)
    assert resolve_attention_backend("auto", CUDA, torch.float16) == "te"


@pytest.mark.parametrize("backend,device,dtype,needle", [
    ("flash", CPU, torch.bfloat16, "not installed"),
    ("te", CUDA, torch.bfloat16, "not installed"),
])
def test_explicit_backend_refused_when_missing(monkeypatch: pytest.MonkeyPatch, backend, device, dtype,
                                                needle: str) -> None:
    monkeypatch.setattr(ab, "_flash_attn", lambda: None)
    monkeypatch.setattr(ab, "_transformer_engine", lambda: None)
    with pytest.raises(ConfigError, match=f"--attention-backend {backend}: .*{needle}.*auto"):
        check_attention_backend(backend, device, dtype)


def test_explicit_backend_refused_on_cpu_or_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "_flash_attn", lambda: _fake_flash_module([]))
    with pytest.raises(ConfigError, match="CUDA tensors, these are on cpu"):
        check_attention_backend("flash", CPU, torch.bfloat16)
    with pytest.raises(ConfigError, match="fp16 or bf16.*--bf16"):
        check_attention_backend("flash", CUDA, torch.float32)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_attention_backend("xformers", CPU, torch.float32)


def test_reference_loop_agrees_with_sdpa() -> None:
    q, k, v = _qkv()
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    expected = torch.stack([_loop_attention(q[b], k[b], v[b], allowed) for b in range(2)])
    torch.testing.assert_close(dot_product_attention(q, k, v, backend="sdpa"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_flash_adapter_matches_sdpa(monkeypatch: pytest.MonkeyPatch, segments) -> None:
    calls: list = []
    monkeypatch.setattr(ab, "_flash_attn", lambda: _fake_flash_module(calls))
    q, k, v = _qkv(1)
    out = ab._flash(q, k, v, segments)
    torch.testing.assert_close(out, dot_product_attention(q, k, v, segments, backend="sdpa"), rtol=1e-5, atol=1e-6)
    if segments is None:
        assert calls == [("dense", True, 0.0)]
    else:
        assert calls == [("varlen", True, [0, 3, 5, 7, 8, 13, 14], 5)]


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_transformer_engine_adapter_matches_sdpa(monkeypatch: pytest.MonkeyPatch, segments) -> None:
    created: list = []
    monkeypatch.setattr(ab, "_transformer_engine", lambda: _fake_te_module(created))
    monkeypatch.setattr(ab, "_TE_MODULES", {})
    q, k, v = _qkv(2)
    out = ab._te(q, k, v, segments)
    ab._te(q, k, v, segments)  # the module is built once per shape and mask kind
    torch.testing.assert_close(out, dot_product_attention(q, k, v, segments, backend="sdpa"), rtol=1e-5, atol=1e-6)
    assert created == [(4, 8, 2, "bshd", "causal" if segments is None else "arbitrary")]
