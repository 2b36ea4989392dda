"""Causal grouped-query self-attention through cuDNN flash attention (NVIDIA GPUs), as JAX
0.10.2 exposes it.

Layout: q [B,T,N,H], k/v [B,T,K,H] (N a multiple of K: query head n reads key head
n // (N/K)), segment ids [B,T] int (0 = padding). Token i attends to key j iff j <= i and
both carry the same segment id; scale 1/sqrt(H); cuDNN keeps the softmax in float32 and
returns q's dtype. No [T,T] mask or bias is ever built. Three row layouts, named to
:func:`supports` and ``causal_attention(..., layout=...)``:

- ``none``: one sequence per row, no padding: ``jax.nn.dot_product_attention(
  implementation="cudnn", is_causal=True)``.
- ``padded``: at most one run of non-zero ids per row, padding on either side (left-padded
  prompts, right-padded rows). Each row is rotated so its run starts at slot 0, attended
  with ``query_seq_lengths`` = ``key_value_seq_lengths`` = the run's length (cuDNN's
  PADDING_CAUSAL mask, which writes zeros to the rows and gradients past the length), and
  rotated back; the rotation's gradient is the opposite rotation (a gather, not a scatter).
- ``packed``: several documents per row (training). The public API has no offsets, so this
  calls JAX's private ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``
  with ``q_offsets``/``kv_offsets`` [B, M+1] and per-segment lengths [B, M] (cuDNN's ragged
  THD layout). Every run of equal ids, padding runs included, is one cuDNN segment, so every
  output and gradient row is written; ``max_segments`` (M, static: it sizes cuDNN's softmax
  statistics, B*M*N*T float32) bounds the runs per row.

What cuDNN through JAX 0.10.2 cannot do (evidence in the installed source,
``jax/_src/cudnn/fused_attention_stablehlo.py``): float32 inputs (``check_layout`` accepts
fp16/bf16/fp8 only, line 289); head dims above 128 before Hopper or 256 from it, or not a
multiple of 8 (line 382); packed rows before Hopper (line 399); packed rows with grouped
KV heads: ``_fix_seqlen_offsets`` scales the KV offsets by the query's N*H (line 533; fixed
upstream after 0.10.2 by jax PR #39521), so K/V heads are repeated up to N here first.
JAX's own tests skip cuDNN attention on CUDA 13 ("no execution plans"), so
:func:`available` says no there. A row whose ids break its layout's promise (two segments
under ``padded``, more than M runs or an id in two places under ``packed``) cannot raise
inside jit: its output is NaN, so the loss shows it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.errors import UserError

LAYOUTS = ("none", "padded", "packed")
DTYPES = (jnp.bfloat16, jnp.float16)


def available() -> tuple[bool, str]:
    """(True, "") on a CUDA GPU (Ampere or newer) whose JAX plugin has cuDNN, else (False,
    why)."""
    if jax.default_backend() != "gpu":
        return False, f"no GPU backend (JAX runs on {jax.default_backend()})"
    device = jax.devices("gpu")[0]
    if "cuda" not in device.client.platform_version.lower():
        return False, f"the GPU backend is not CUDA ({device.client.platform_version})"
    from jax._src.lib import cuda_versions
    if cuda_versions is None:
        return False, "cuDNN is not importable (no jax_cuda12/13 plugin with _versions)"
    if cuda_versions.cuda_runtime_get_version() >= 13000:
        return False, ("JAX 0.10.2's own tests skip cuDNN attention on CUDA 13 "
                       "(cuDNN creates no execution plans)")
    if capability() < (8, 0):
        return False, (f"cuDNN flash attention needs compute capability 8.0+, not "
                       f"{device.compute_capability}")
    return True, ""


def capability() -> tuple[int, int]:
    """The first GPU's compute capability, (0, 0) without one."""
    if jax.default_backend() != "gpu":
        return 0, 0
    major, minor = jax.devices("gpu")[0].compute_capability.split(".")[:2]
    return int(major), int(minor)


def supports(segments: str, dtype=jnp.bfloat16, head_dim: int = 128,
             compute_capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """Whether :func:`causal_attention` takes rows of this ``segments`` layout (see
    :data:`LAYOUTS`), dtype and head dim on this GPU (or ``compute_capability``), decided
    statically: (True, "") or (False, one line for the log on what runs instead)."""
    if segments not in LAYOUTS:
        raise ValueError(f"segments must be one of {LAYOUTS}, got {segments!r}")
    cap = capability() if compute_capability is None else tuple(compute_capability)
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return False, (f"cuDNN flash attention through JAX 0.10.2 takes bfloat16/float16, "
                       f"not {jnp.dtype(dtype).name}: XLA attention runs instead")
    if cap < (8, 0):
        return False, (f"cuDNN flash attention needs an Ampere or newer GPU (sm "
                       f"{cap[0]}.{cap[1]}): XLA attention runs instead")
    h_max = 256 if cap >= (9, 0) else 128
    if head_dim > h_max or head_dim % 8:
        return False, (f"cuDNN flash attention takes head dims <= {h_max} that are multiples "
                       f"of 8, not {head_dim}: XLA attention runs instead")
    if segments == "packed" and cap < (9, 0):
        return False, ("cuDNN through JAX 0.10.2 packs segments on Hopper or newer only "
                       f"(this GPU is sm {cap[0]}.{cap[1]}): XLA attention runs instead")
    return True, ""


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     *, layout: str | None = None, max_segments: int | None = None,
                     implementation: str = "cudnn") -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] int or None -> [B,T,N,H] in q's dtype.

    ``layout`` (default ``padded`` with segment ids, ``none`` without) and, for
    ``packed``, ``max_segments`` (runs of equal ids per row, padding runs included) are
    described in the module docstring. ``implementation="xla"`` runs the ``none`` and
    ``padded`` layouts through JAX's XLA path with the same lengths (CPU tests only)."""
    layout = layout or ("none" if segment_ids is None else "padded")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if q.dtype not in DTYPES and implementation == "cudnn":
        raise UserError(f"cuDNN attention takes bfloat16/float16 (JAX 0.10.2 has no float32 "
                        f"cuDNN path), got {q.dtype}; use a bf16 compute dtype or --attention xla")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"causal_attention is self-attention: {q.shape[1]} queries, "
                         f"{k.shape[1]} keys")
    if layout == "none":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    if segment_ids is None:
        raise ValueError(f"layout {layout!r} needs segment ids")
    segment_ids = segment_ids.astype(jnp.int32)
    if layout == "padded":
        start, length, ok = padded_rows(segment_ids)
        length = jnp.maximum(length, 1)   # an all-padding row: slot 0 attends to itself
        out = jax.nn.dot_product_attention(
            *(roll_rows(x, start) for x in (q, k, v)), is_causal=True,
            query_seq_lengths=length, key_value_seq_lengths=length, implementation=implementation)
        out = roll_rows(out, -start)
    else:
        if max_segments is None or max_segments < 2:
            raise ValueError("layout 'packed' needs max_segments >= 2 (JAX treats one as unpacked)")
        from jax._src.cudnn import fused_attention_stablehlo as fa
        seqlens, offsets, ok = packed_rows(segment_ids, max_segments)
        groups = q.shape[2] // k.shape[2]
        if groups > 1:  # JAX 0.10.2 strides KV offsets by the query's heads (see above)
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = fa.dot_product_attention(
            q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
            scale=1.0 / math.sqrt(q.shape[-1]), mask_type=fa.MaskType.PADDING_CAUSAL)
    return jnp.where(ok[:, None, None, None], out, jnp.nan).astype(q.dtype)


def padded_rows(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B,T] ids -> (start, length, ok), each [B] int32/bool: where the row's run of non-zero
    ids starts (0 for an all-padding row), its length, and whether the row holds at most one
    such run."""
    real = segment_ids != 0
    starts = _run_starts(segment_ids) & real
    return (jnp.argmax(real, axis=1).astype(jnp.int32), real.sum(1, dtype=jnp.int32),
            starts.sum(1) <= 1)


def packed_rows(segment_ids: jax.Array, max_segments: int):
    """[B,T] ids -> (lengths [B,M], offsets [B,M+1], ok [B]) in the form JAX's private cuDNN
    call takes: every maximal run of equal ids (padding runs too) is a segment, its start in
    ``offsets`` and its length in ``lengths``, -1 past the row's last run. ``ok`` is False
    where a row has more than M runs or a non-zero id in two runs."""
    b, t = segment_ids.shape
    first = _run_starts(segment_ids)
    runs_so_far = jnp.cumsum(first, axis=1, dtype=jnp.int32)      # 1-based run index per slot
    # [B,M+1]: where runs 1..M+1 start (T past the row's last run)
    bounds = jax.vmap(lambda row: jnp.searchsorted(
        row, jnp.arange(1, max_segments + 2, dtype=jnp.int32)))(runs_so_far)
    start, end = bounds[:, :-1].astype(jnp.int32), bounds[:, 1:].astype(jnp.int32)
    present = start < t
    lengths = jnp.where(present, end - start, -1)
    offsets = jnp.concatenate([jnp.where(present, start, -1), jnp.full((b, 1), -1, jnp.int32)], 1)
    ordered = jnp.sort(segment_ids, axis=1)
    distinct_ids = jnp.sum(_run_starts(ordered) & (ordered != 0), axis=1)
    real_runs = jnp.sum(first & (segment_ids != 0), axis=1)
    ok = (runs_so_far[:, -1] <= max_segments) & (real_runs == distinct_ids)
    return lengths, offsets, ok


def _run_starts(ids: jax.Array) -> jax.Array:
    """[B,T] bool: slot t starts a run of equal ids."""
    return jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)


@jax.custom_vjp
def roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """x [B,T,...] -> y with y[b, i] = x[b, (i + shift[b]) mod T]."""
    return _roll(x, shift)


def _roll(x, shift):
    slots = (jnp.arange(x.shape[1], dtype=jnp.int32)[None] + shift[:, None]) % x.shape[1]
    return jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)


roll_rows.defvjp(lambda x, shift: (_roll(x, shift), shift),
                 lambda shift, g: (_roll(g, -shift), np.zeros(shift.shape, jax.dtypes.float0)))
