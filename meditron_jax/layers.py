"""The pieces of a Llama block as pure functions.

Einsum letters: B batch, T query positions, S key positions, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import cpu_gemm
from meditron_jax.config import LlamaConfig


@functools.partial(jax.tree_util.register_dataclass, data_fields=["t"],
                   meta_fields=["out_shape"])
@dataclasses.dataclass(frozen=True)
class OutIn:
    """A projection weight stored transposed: ``t`` is [prod(out_shape), in].

    The checkpoint layout is [in, out...] (``x @ W``). For a few rows of x (batched
    decoding) XLA:CPU's kernels run ``W^T @ x^T`` with the weight as the large left
    operand up to 3x faster (bench/NOTES.md); :func:`meditron_jax.model.unstack_layers`
    builds this layout for CPU decoding and :func:`dense` computes with either.
    """
    t: jax.Array
    out_shape: tuple

    @staticmethod
    def of(w: jax.Array, contract: int = 1) -> "OutIn":
        """From [in..., out...] with the first ``contract`` dims contracted."""
        inner = math.prod(w.shape[:contract])
        return OutIn(w.reshape(inner, -1).T, tuple(w.shape[contract:]))

    def astype(self, dtype) -> "OutIn":
        return OutIn(self.t.astype(dtype), self.out_shape)


# Rows from which an OutIn product runs as an ordinary GEMM (x @ t^T) again.
OUT_IN_MAX_ROWS = 64
# Query rows per kv head (G * T) from which cached attention's products go to oneMKL:
# decoding's few rows stay on XLA's batched dot.
ATTENTION_BLAS_ROWS = 64


def dense(x: jax.Array, w, spec: str, preferred_element_type=None,
          impl: str = "xla") -> jax.Array:
    """``einsum(spec, x, w)`` for x [M, in...] and a weight [in..., out...], or the
    same product with an :class:`OutIn` weight (returned as [M, out...]).

    ``impl="blas"`` (from :func:`meditron_jax.cpu_gemm.resolve`: one CPU device) runs
    float32 products as one 2-D oneMKL GEMM; other dtypes stay on XLA's dot."""
    out_in = isinstance(w, OutIn)
    # Decoding's few rows against transposed weights stay on XLA's weight-left product:
    # it streamed the weights faster than oneMKL did (decode b8 198 vs 108 tokens/s).
    if (impl == "blas" and cpu_gemm.supports(x, w.t if out_in else w)
            and not (out_in and x.shape[0] < OUT_IN_MAX_ROWS)):
        return _dense_blas(x, w, spec)
    if out_in:
        x2 = x.reshape(x.shape[0], -1)
        if x2.shape[0] >= OUT_IN_MAX_ROWS:  # many rows (prefill): an ordinary GEMM
            y = jnp.einsum("MK,NK->MN", x2, w.t, preferred_element_type=preferred_element_type)
        else:
            y = jnp.matmul(w.t, x2.T, preferred_element_type=preferred_element_type)
            # The barrier keeps XLA from folding the transpose back into the dot (as
            # x @ t^T, the slow form for few rows): the weight stays the left operand.
            y = jax.lax.optimization_barrier(y).T
        return y.reshape(x.shape[0], *w.out_shape)
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _dense_blas(x: jax.Array, w, spec: str) -> jax.Array:
    """:func:`dense` as one [rows, in] x [in, out] GEMM: ``spec`` contracts x's trailing
    dims with w's leading ones (as every projection of the model does)."""
    if isinstance(w, OutIn):
        y = cpu_gemm.matmul(x.reshape(x.shape[0], -1), w.t, False, True)
        return y.reshape(x.shape[0], *w.out_shape)
    inputs, out = spec.replace("...", "").split("->")
    lhs, rhs = inputs.split(",")
    n = len((set(lhs) & set(rhs)) - set(out))
    if lhs[len(lhs) - n:] != rhs[:n]:
        raise ValueError(f"dense spec {spec!r}: x's trailing dims must be w's leading ones")
    inner = math.prod(w.shape[:n])
    y = cpu_gemm.matmul(x.reshape(-1, inner), w.reshape(inner, -1))
    return y.reshape(*x.shape[:x.ndim - n], *w.shape[n:])


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              impl: str | None = None) -> jax.Array:
    """Grouped-query attention, softmax in float32.

    q [B,T,N,H], k/v [B,S,K,H], mask [B,1,T,S] -> [B,T,N,H]. ``impl`` is passed to
    ``jax.nn.dot_product_attention`` (None lets JAX pick; "cudnn" on GPU).
    """
    if impl == "einsum":
        return _einsum_attention(q, k, v, mask)
    if impl is None:
        # An additive bias instead of a select: the select's backward keeps the mask,
        # broadcast to every layer's [B,N,T,S] logits, as a scanned residual (a
        # 0.6 GB write per training step at 4x512; bench/NOTES.md).
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min * 0.7).astype(jnp.float32)
        return jax.nn.dot_product_attention(q, k, v, bias=bias)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     impl: str | None = None, chunks: int = 4,
                     matmul_impl: str = "xla", segment_ids: jax.Array | None = None
                     ) -> jax.Array:
    """:func:`attention` over a whole sequence without a cache (query slot i is key
    slot i): query chunk c needs only the keys up to its own end, so the blocks above
    the causal diagonal are never computed (for 4 chunks, 5/8 of the full products).
    Every query still sees itself, so no row's softmax changes.

    With ``matmul_impl="blas"`` and the ``segment_ids`` the mask was made from, float32
    attention that is not differentiated runs as one oneMKL flash-style custom call
    (:func:`meditron_jax.cpu_gemm.causal_attention`); its gradient is the chunked
    computation's."""
    t = q.shape[1]
    if chunks <= 1 or t % chunks or k.shape[1] != t:
        return attention(q, k, v, mask, impl)
    if impl is None and jax.default_backend() != "gpu":  # GPU: let JAX pick (cuDNN)
        if (matmul_impl == "blas" and segment_ids is not None
                and cpu_gemm.supports(q, k, v)):
            return _flash_cpu(q, k, v, segment_ids, mask, chunks)
        return _causal_head_major(q, k, v, mask, chunks, matmul_impl)
    size = t // chunks
    out = [attention(q[:, c * size:(c + 1) * size], k[:, :(c + 1) * size],
                     v[:, :(c + 1) * size], mask[:, :, c * size:(c + 1) * size, :(c + 1) * size],
                     impl) for c in range(chunks)]
    return jnp.concatenate(out, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_cpu(q, k, v, segment_ids, mask, chunks: int):
    # the kernel masks from segment_ids itself (causal, same segment: what mask holds)
    return cpu_gemm.causal_attention(q, k, v, segment_ids, 1.0 / math.sqrt(q.shape[-1]))


def _flash_cpu_fwd(q, k, v, segment_ids, mask, chunks: int):
    # Differentiated: the chunked products (whose backward is XLA's autodiff of them).
    out, vjp = jax.vjp(lambda q, k, v: _causal_head_major(q, k, v, mask, chunks, "blas"),
                       q, k, v)
    return out, vjp


def _flash_cpu_bwd(chunks: int, vjp, g):
    return (*vjp(g), None, None)


_flash_cpu.defvjp(_flash_cpu_fwd, _flash_cpu_bwd)


def _causal_head_major(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                       chunks: int, matmul_impl: str = "xla") -> jax.Array:
    """:func:`causal_attention` with q, k and v made head-major once (q [B,K,G,T,H],
    k/v [B,K,S,H]), so every chunk's two products are batched matmuls over contiguous
    [T, H] / [S, H] blocks; ``jax.nn.dot_product_attention`` on [B,T,N,H] had XLA:CPU
    transpose the keys and values again for each chunk. In float32 the 1/sqrt(H) scale
    goes on q (one pass over [T, H], not over the [T, S] logits); other dtypes scale the
    float32 logits as before. Forward 1.7x, forward+backward 1.4x faster per layer on
    `small` (bench/NOTES.md). With ``matmul_impl="blas"`` both products are batched
    oneMKL GEMMs over the B*K heads."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    scale = np.float32(1.0 / math.sqrt(h))
    qh = q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    if q.dtype == jnp.float32:
        qh, scale = qh * scale, None
    kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min * 0.7).astype(jnp.float32)[:, :, None]
    size = t // chunks
    out = []
    for c in range(chunks):
        rows, keys = slice(c * size, (c + 1) * size), slice(0, (c + 1) * size)
        logits = _head_products(qh[:, :, :, rows], kh[:, :, keys], True, matmul_impl)
        if scale is not None:
            logits = logits * scale
        probs = jax.nn.softmax(logits + bias[:, :, :, rows, keys], axis=-1).astype(v.dtype)
        out.append(_head_products(probs, vh[:, :, keys], False, matmul_impl))
    return jnp.concatenate(out, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _head_products(x: jax.Array, y: jax.Array, keys: bool, matmul_impl: str) -> jax.Array:
    """Per (B, K) head: x [B,K,G,T,*] with y [B,K,S,H]. ``keys``: the logits x @ y^T
    -> [B,K,G,T,S] (float32); else the values probs @ y -> [B,K,G,T,H]."""
    b, kv, g, t = x.shape[:4]
    if matmul_impl == "blas" and cpu_gemm.supports(x, y):
        flat = cpu_gemm.matmul(x.reshape(b * kv, g * t, x.shape[-1]),
                               y.reshape(b * kv, *y.shape[2:]), False, keys)
        return flat.reshape(b, kv, g, t, -1)
    if keys:
        return jnp.einsum("BKGTH,BKSH->BKGTS", x, y, preferred_element_type=jnp.float32)
    return jnp.einsum("BKGTS,BKSH->BKGTH", x, y)


def _einsum_attention(q, k, v, mask):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = logits / np.float32(math.sqrt(h))
    big_neg = jnp.finfo(jnp.float32).min * 0.7
    logits = jnp.where(mask[:, :, None, :, :], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def attention_head_major(q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: jax.Array, matmul_impl: str = "xla") -> jax.Array:
    """Grouped-query attention over head-major keys/values, softmax in float32.

    q [B,T,N,H], k/v [B*K,S,H] (one batch dim: the per-layer decode cache), mask
    [B,1,T,S] -> [B,T,N,H]. Each head's keys are one contiguous [S, H] block that
    XLA:CPU's batched dot reads in place; the [B,S,K,H] layout makes it transpose the
    whole cache first (8x slower decode attention at batch 8, bench/NOTES.md).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    kv_heads = k.shape[0] // b
    g = n // kv_heads
    # Q = G*T query rows per kv head, so both products are plain batched matmuls
    # ([B*K] batch, no transposed operand) that XLA:CPU hands to its fast kernel.
    qh = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g * t, h)
    blas = (matmul_impl == "blas" and cpu_gemm.supports(qh, k, v)
            and g * t >= ATTENTION_BLAS_ROWS)
    if blas:
        logits = cpu_gemm.matmul(qh, k, False, True)
    else:
        logits = jnp.einsum("BQH,BSH->BQS", qh, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv_heads, g, t, s) / np.float32(math.sqrt(h))
    logits = jnp.where(mask[:, :, None, :, :], logits, jnp.finfo(jnp.float32).min * 0.7)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b * kv_heads, g * t, s)
    if blas:  # probs are in v's dtype, float32 here
        out = cpu_gemm.matmul(probs, v)
    else:
        out = jnp.einsum("BQS,BSH->BQH", probs, v)
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def swiglu(x: jax.Array, gate, up, down, impl: str = "xla") -> jax.Array:
    """x [..., D] -> [..., D] (the model passes [B*T, D] rows; :class:`OutIn` weights
    take only [M, D])."""
    g = dense(x, gate, "...D,DF->...F", impl=impl)
    u = dense(x, up, "...D,DF->...F", impl=impl)
    return dense(jax.nn.silu(g) * u, down, "...F,FD->...D", impl=impl)
