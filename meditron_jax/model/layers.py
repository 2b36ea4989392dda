"""The pieces of a Llama block as pure functions: RMSNorm, RoPE, the attention mask and
the SwiGLU MLP. Attention itself runs through :mod:`meditron_jax.kernels`.

Einsum letters: B batch, T query positions, S key positions, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.model.config import LlamaConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def _rdiv(x: float, t: np.ndarray) -> np.ndarray:
    """torch's ``x / t`` for a Python scalar x: ``t.reciprocal() * float32(x)``, two roundings."""
    return (np.float32(1) / t) * np.float32(x)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies with the config's scaling, bitwise equal to transformers'.

    Each step is the float32 operation of transformers' ``_compute_*_rope_parameters``, in
    its order: Python scalars cast to float32, ``scalar / tensor`` as :func:`_rdiv`.
    ``theta ** (2i / d)`` is rounded from float64, not taken from numpy's float32 ``power``,
    which on AVX-512 hosts dispatches to Intel SVML and is not correctly rounded (a
    one-step error in a frequency moves logits by ~1e-2 at 32K positions). torch's float32
    pow (SLEEF, within 1 ulp on AVX2 and AVX-512 alike) equals the correctly rounded value
    at the settings tests/test_rope_long.py checks; at some others (theta 1e6, head_dim
    128) it is one step off in one frequency.
    """
    f32 = np.float32
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(f32) / f32(cfg.head_dim)
    theta = float(f32(cfg.rope_theta))
    inv_freq = _rdiv(1.0, np.array([theta ** float(e) for e in exponents]).astype(f32))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        return inv_freq / f32(rs.factor)
    if rs.rope_type == "llama3":
        old_ctx = rs.original_max_position_embeddings
        low_wavelen = f32(old_ctx / rs.low_freq_factor)
        high_wavelen = f32(old_ctx / rs.high_freq_factor)
        wavelen = _rdiv(2 * math.pi, inv_freq)
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(rs.factor), inv_freq)
        smooth = ((_rdiv(old_ctx, wavelen) - f32(rs.low_freq_factor))
                  / f32(rs.high_freq_factor - rs.low_freq_factor))
        smoothed = (f32(1) - smooth) * scaled / f32(rs.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(positions: jax.Array, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, head_dim] (rotate-half layout), float32.

    The angles are transformers' bitwise (``inv_freq @ position_ids`` has one term: one
    float32 rounding); their cos/sin agree with torch's within one float32 step at any
    position, each being within one step of the exact value. (transformers' scale
    ``attention_scaling`` is 1 for every rope type supported here.)
    """
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, H]; cos/sin [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask(q_segments: jax.Array, q_slots: jax.Array,
                   kv_segments: jax.Array) -> jax.Array:
    """Boolean [B, 1, T, S]: same segment and key slot not after the query slot.

    Causality is by slot index, not by position, so left padding and packing need no
    special cases: pad tokens carry segment 0 and real tokens never see them.
    """
    kv_slots = jnp.arange(kv_segments.shape[1], dtype=jnp.int32)
    causal = kv_slots[None, None, :] <= q_slots[:, :, None]
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return (causal & same)[:, None, :, :]


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D]: down(silu(x @ gate) * (x @ up))."""
    g = jnp.einsum("...D,DF->...F", x, gate)
    u = jnp.einsum("...D,DF->...F", x, up)
    return jnp.einsum("...F,FD->...D", jax.nn.silu(g) * u, down)
