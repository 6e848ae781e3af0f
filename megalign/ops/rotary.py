"""Rotary position embeddings (Su et al., 2021) in the half-split convention of HF LLaMA/Qwen2.

Frequencies: ``inv_freq[i] = theta ** (-2i / head_dim)`` for ``i < head_dim / 2``. With Llama-3.1 scaling
(:class:`RopeScaling`), each frequency is rescaled by its wavelength ``w = 2*pi / inv_freq``, with
``L = original_max_position_embeddings``:

* ``w < L / high_freq_factor`` (high frequencies): unchanged;
* ``w > L / low_freq_factor`` (low frequencies): divided by ``factor``;
* otherwise: ``(1 - s) * inv_freq / factor + s * inv_freq`` with
  ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

The angles ``pos * inv_freq`` are duplicated to ``head_dim`` (``cat(f, f)``) and a vector is rotated as
``x * cos + rotate_half(x) * sin`` where ``rotate_half([a, b]) = [-b, a]`` splits the last dimension in
halves (not the interleaved pairs of the original Meta checkpoints).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from megalign.config.model import RopeScaling

__all__ = ["RopeScaling", "apply_rotary", "apply_rotary_reference", "rotary_cos_sin", "rotary_inv_freq"]


def rotary_inv_freq(
    head_dim: int, theta: float, scaling: Optional[RopeScaling] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """fp32 inverse frequencies ``[head_dim // 2]``, Llama-3.1-scaled when ``scaling`` is given."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rotary: head_dim={head_dim} must be a positive even number")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    if scaling is None:
        return inv_freq
    orig = float(scaling.original_max_position_embeddings)
    low, high = float(scaling.low_freq_factor), float(scaling.high_freq_factor)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    medium = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > orig / low, inv_freq / scaling.factor, medium)
    return torch.where(wavelen < orig / high, inv_freq, out)


def rotary_cos_sin(
    positions: Union[int, torch.Tensor],
    head_dim: int,
    theta: float = 10000.0,
    scaling: Optional[RopeScaling] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``positions`` (a sequence length, or position ids ``[seq]`` / ``[batch, seq]``).

    Returns two tensors of shape ``positions.shape + (head_dim,)`` (``[seq, head_dim]`` for an int), computed
    in fp32 and cast to ``dtype``.
    """
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"rotary_cos_sin: sequence length {positions} must be >= 0")
        pos = torch.arange(positions, device=device)
    else:
        if positions.dtype.is_floating_point or positions.dim() not in (1, 2):
            raise ValueError(
                f"rotary_cos_sin: position ids must be an integer tensor [seq] or [batch, seq], "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        pos = positions.to(device) if device is not None else positions
    inv_freq = rotary_inv_freq(head_dim, theta, scaling, device=pos.device)
    angles = pos.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """PyTorch reference (computed in fp32, cast back to ``x.dtype``): the CPU path and the kernel oracle."""
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: expected x of shape [batch, seq, heads, head_dim], got {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2:] != (x.shape[1], x.shape[3]):
        raise ValueError(
            f"apply_rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be "
            f"[seq, head_dim] or [batch, seq, head_dim] for x {tuple(x.shape)}"
        )
    c = cos.float().unsqueeze(-2)
    s = sin.float().unsqueeze(-2)
    x32 = x.float()
    return (x32 * c + _rotate_half(x32) * s).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``x`` ``[batch, seq, heads, head_dim]`` by the angles in ``cos``/``sin``.

    ``cos``/``sin`` come from :func:`rotary_cos_sin`: ``[seq, head_dim]`` (shared by the batch) or
    ``[batch, seq, head_dim]`` (per-sample position ids); they broadcast over heads.
    """
    return apply_rotary_reference(x, cos, sin)
