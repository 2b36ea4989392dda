"""Attention in plain XLA operations: the path for backends without a kernel of their own
(CPU), the fallback, and the reference the kernels are tested against.

Both functions compute grouped-query attention head-major: q as [B, K, G, T, H] (G query
heads per key head) against keys/values [B, K, S, H], so each product is a batched matmul
over contiguous [T, H] / [S, H] blocks with no transposed operand. Softmax is float32;
masked logits get a large negative bias (a bias, not a select: a select's backward keeps
the broadcast mask as a residual of every layer).
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

# Query chunks of the cache-free causal path: chunk c reads only the keys up to its own
# end, so the blocks above the causal diagonal are never computed (for 4 chunks, 5/8 of
# the full products) and at most a quarter of the [T, S] logits is alive at once.
CAUSAL_CHUNKS = 4
# From this length on the cache-free path is blockwise (:func:`.context.flash_attention`):
# [block, block] tiles with an online softmax, so no [T, T] mask or logits exist (a [T, T]
# float32 bias is 4 GiB at 32768 tokens).
BLOCKWISE_FROM = 8192
_NEG = float(np.finfo(np.float32).min) * 0.7


@contextlib.contextmanager
def dense_for_counting():
    """Trace the dense path at every length while inside (``plan``'s FLOP count, which lowers
    and never compiles: the blockwise loops' data-dependent trip counts count once there)."""
    global BLOCKWISE_FROM
    saved, BLOCKWISE_FROM = BLOCKWISE_FROM, 1 << 62
    try:
        yield
    finally:
        BLOCKWISE_FROM = saved


def self_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: key j visible to query i iff j <= i and both share a segment."""
    t = segment_ids.shape[1]
    slots = jnp.arange(t, dtype=jnp.int32)
    causal = slots[None, :] <= slots[:, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     chunks: int = CAUSAL_CHUNKS) -> jax.Array:
    """Self-attention over one whole sequence: q [B,T,N,H], k/v [B,T,K,H], segment ids
    [B,T] (0 = padding) -> [B,T,N,H]; scale 1/sqrt(H)."""
    t = q.shape[1]
    block = math.gcd(t, 512)
    if t >= BLOCKWISE_FROM and block >= 128:
        from meditron_jax.kernels.context import flash_attention
        return flash_attention(q, k, v, segment_ids, segment_ids,
                               jnp.arange(0, t, block, dtype=jnp.int32), block=block)
    bias = _bias(self_mask(segment_ids))
    kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if chunks <= 1 or t % chunks:
        return cached_attention(q, kh, vh, bias=bias)
    size = t // chunks
    qh, scale = _head_major_queries(q, k.shape[2])
    out = [_attend(qh[:, :, :, c * size:(c + 1) * size], kh[:, :, :(c + 1) * size],
                   vh[:, :, :(c + 1) * size], bias[..., c * size:(c + 1) * size, :(c + 1) * size],
                   scale) for c in range(chunks)]
    return _token_major(jnp.concatenate(out, axis=3))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     *, bias: jax.Array | None = None) -> jax.Array:
    """q [B,T,N,H] against head-major keys/values [B,K,S,H] (the KV cache's layout) under
    ``mask`` [B,1,T,S] (or an additive ``bias`` of that shape) -> [B,T,N,H]."""
    bias = _bias(mask) if bias is None else bias
    qh, scale = _head_major_queries(q, k.shape[1])
    return _token_major(_attend(qh, k, v, bias, scale))


def _bias(mask: jax.Array) -> jax.Array:
    return jnp.where(mask, 0.0, _NEG).astype(jnp.float32)


def _head_major_queries(q: jax.Array, kv_heads: int):
    """q [B,T,N,H] -> ([B,K,G,T,H], scale still to apply to the logits or None). In float32
    the 1/sqrt(H) scale goes on q (one pass over [T,H] instead of the [T,S] logits)."""
    b, t, n, h = q.shape
    qh = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    scale = np.float32(1.0 / math.sqrt(h))
    if q.dtype == jnp.float32:
        return qh * scale, None
    return qh, scale


def _attend(qh, kh, vh, bias, scale):
    """qh [B,K,G,T,H], kh/vh [B,K,S,H], bias [B,1,T,S] -> [B,K,G,T,H]."""
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", qh, kh, preferred_element_type=jnp.float32)
    if scale is not None:
        logits = logits * scale
    probs = jax.nn.softmax(logits + bias[:, :, None], axis=-1).astype(vh.dtype)
    return jnp.einsum("BKGTS,BKSH->BKGTH", probs, vh)


def _token_major(out: jax.Array) -> jax.Array:
    b, kv, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)
