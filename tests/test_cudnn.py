"""cuDNN flash attention (meditron_jax.kernels.cudnn).

On CPU: the segment-id conversions against independent numpy loops; the ``padded``
layout's rotate / lengths / rotate-back logic end to end through JAX's XLA path with the
same lengths (float32, forward and q/k/v gradients within 1e-5 of an einsum reference);
the packed offsets through JAX's own offset fix-up against the element offsets cuDNN's THD
layout needs; supports() and the refusals. On a GPU (``-m gpu``, with JAX_PLATFORMS
allowing cuda): the real cuDNN kernel against the einsum reference for every layout.

bf16/f16 tolerances: rounding the exact answer to bfloat16 alone (unit roundoff 2^-8)
leaves a relative RMS error of 1.6e-3 and a max error of 2-2.8e-3 of max|ref| on these
shapes, and a CPU emulation of flash-attention numerics (P rounded to bf16 before P@V and
dS before dQ/dK) gives 1.9-2.6e-3 and up to 4.5e-3; so the GPU tests assert relative RMS
<= 5e-3 and max error <= 1e-2 * max|ref| (a single query row of the packed case also
attending the previous document's keys gives 2.4e-2 and 0.28). Float32 has no cuDNN path
in JAX 0.10.2 and is refused.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from meditron_jax.errors import UserError
from meditron_jax.kernels import cudnn

B, T, N, K, H = 4, 256, 8, 2, 64
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")


# ---- independent numpy versions of the conversions ---------------------------------------
def np_runs(row):
    """[(start, length, id)] of the maximal runs of equal ids, by a plain loop."""
    runs, start = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or row[t] != row[start]:
            runs.append((start, t - start, int(row[start])))
            start = t
    return runs


def np_packed(ids, m):
    b, t = ids.shape
    lengths, offsets, ok = -np.ones((b, m), np.int32), -np.ones((b, m + 1), np.int32), []
    for r, row in enumerate(ids):
        runs = np_runs(row)
        for i, (start, length, _) in enumerate(runs[:m]):
            offsets[r, i], lengths[r, i] = start, length
        real = [seg for _, _, seg in runs if seg]
        ok.append(len(runs) <= m and len(real) == len(set(real)))
    return lengths, offsets, np.array(ok)


def np_padded(ids):
    starts, lengths, ok = [], [], []
    for row in ids:
        real = [(s, n) for s, n, seg in np_runs(row) if seg]
        starts.append(real[0][0] if real else 0)
        lengths.append(int(np.sum(row != 0)))
        ok.append(len(real) <= 1)
    return np.array(starts), np.array(lengths), np.array(ok)


CASES = {
    "contiguous runs": [1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5],
    "left padding": [0, 0, 0, 0, 0, 7, 7, 7, 7, 7, 7, 7],
    "packed, trailing padding": [1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],
    "all padding": [0] * 12,
    "one segment, no padding": [1] * 12,
    "padding on both sides": [0, 0, 5, 5, 5, 5, 5, 5, 0, 0, 0, 0],
    "an id in two places": [1, 1, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0],
    "too many runs": [1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("m", [2, 4, 6])
def test_packed_rows_equal_numpy(m):
    rng = np.random.default_rng(m)
    rows = [np.array(r, np.int32) for r in CASES.values()]
    for _ in range(20):  # random first-fit-like rows: ids 1, 2, ... then padding
        cuts = np.sort(rng.choice(np.arange(1, 12), size=rng.integers(0, 5), replace=False))
        row = np.zeros(12, np.int32)
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, 12])):
            row[a:b] = i + 1
        row[12 - rng.integers(0, 4):] = 0
        rows.append(row)
    ids = np.stack(rows)
    lengths, offsets, ok = jax.jit(cudnn.packed_rows, static_argnums=1)(jnp.asarray(ids), m)
    want = np_packed(ids, m)
    np.testing.assert_array_equal(lengths, want[0])
    np.testing.assert_array_equal(offsets, want[1])
    np.testing.assert_array_equal(ok, want[2])
    by_name = dict(zip(CASES, np.asarray(ok)))
    assert not by_name["an id in two places"] and not by_name["too many runs"]
    assert by_name["all padding"] and by_name["left padding"]
    if m >= 4:
        assert by_name["packed, trailing padding"]


def test_packed_rows_cover_every_slot():
    """Every token lies in exactly one cuDNN segment, so every output row gets written."""
    ids = jnp.asarray(np.stack([np.array(r, np.int32) for n, r in CASES.items()
                                if n != "too many runs"]))
    lengths, offsets, _ = cudnn.packed_rows(ids, 6)
    for row_lengths, row_offsets in zip(np.asarray(lengths), np.asarray(offsets)):
        used = row_lengths >= 0
        assert row_offsets[0] == 0 and np.sum(row_lengths[used]) == 12
        np.testing.assert_array_equal(row_offsets[1:used.sum()],
                                      np.cumsum(row_lengths[used])[:-1])


def test_padded_rows_equal_numpy():
    ids = np.stack([np.array(r, np.int32) for r in CASES.values()])
    start, length, ok = cudnn.padded_rows(jnp.asarray(ids))
    want = np_padded(ids)
    for got, expected in zip((start, length, ok), want):
        np.testing.assert_array_equal(got, expected)
    assert list(np.asarray(ok)) == [False, True, False, True, True, True, False, False]


def test_roll_rows_and_its_gradient():
    x = jax.random.normal(jax.random.key(0), (3, 7, 2, 5))
    shift = jnp.array([0, 3, -2], jnp.int32)
    want = np.stack([np.roll(np.asarray(x[b]), -int(s), axis=0) for b, s in enumerate(shift)])
    np.testing.assert_array_equal(cudnn.roll_rows(x, shift), want)
    np.testing.assert_array_equal(cudnn.roll_rows(cudnn.roll_rows(x, shift), -shift), x)
    w = jax.random.normal(jax.random.key(1), x.shape)
    grad = jax.grad(lambda x: jnp.sum(cudnn.roll_rows(x, shift) * w))(x)
    want = np.stack([np.roll(np.asarray(w[b]), int(s), axis=0) for b, s in enumerate(shift)])
    np.testing.assert_allclose(grad, want, rtol=0, atol=0)


# ---- the reference ----------------------------------------------------------------------
def reference(q, k, v, segment_ids):
    """Plain float32 einsum attention: key j visible to query i iff j <= i and same id."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    t = q.shape[1]
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    visible = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None] & (
        segment_ids[:, :, None] == segment_ids[:, None, :])
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(visible[:, None], logits, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def inputs(dtype, segment_ids, seed=0):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    shape = lambda heads: (B, T, heads, H)
    q, k, v = (jax.random.normal(key, shape(h), jnp.float32).astype(dtype)
               for key, h in ((kq, N), (kk, K), (kv, K)))
    real = jnp.ones((B, T)) if segment_ids is None else (segment_ids != 0)
    # padding rows' outputs are never used: their cotangent is zero
    weights = jax.random.normal(kw, shape(N), jnp.float32) * real[:, :, None, None]
    return q, k, v, weights


def value_and_grads(fn, q, k, v, weights):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
        q, k, v)


def segments(kind):
    ids = np.ones((B, T), np.int32)
    if kind == "padded":
        ids[0, :37] = 0                        # left padding (a prompt)
        ids[1, 200:] = 0                       # right padding
        ids[2, :] = 0                          # all padding
        ids[3, :5], ids[3, 250:] = 0, 0        # both sides
    elif kind == "packed":
        ids[0, 100:180], ids[0, 180:230], ids[0, 230:] = 2, 3, 0   # three documents + padding
        ids[1, :64], ids[1, 64:] = 0, 4                             # left padding + one document
        ids[2, :] = 0                                               # all padding
        ids[3, 1:] = 2                                              # a one-token document first
    return None if kind == "none" else jnp.asarray(ids)


@pytest.mark.parametrize("kind", ["none", "padded"])
def test_layouts_through_xla_equal_reference(kind):
    """The rotate / seq-lengths / rotate-back plumbing, exact in float32 (XLA path)."""
    ids = segments(kind)
    q, k, v, w = inputs(jnp.float32, ids)
    with jax.default_matmul_precision("highest"):  # no TF32 when this runs on a GPU
        out, grads = value_and_grads(
            lambda q, k, v: cudnn.causal_attention(q, k, v, ids, implementation="xla"),
            q, k, v, w)
        ref, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, ids), q, k, v, w)
    real = np.ones((B, T), bool) if ids is None else np.asarray(ids != 0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_padded_layout_poisons_a_row_with_two_segments():
    ids = np.ones((B, T), np.int32)
    ids[1, 100:] = 2
    q, k, v, _ = inputs(jnp.float32, None)
    out = np.asarray(cudnn.causal_attention(q, k, v, jnp.asarray(ids), implementation="xla"))
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2, 3]]))


def test_offsets_reach_cudnn_as_thd_element_offsets():
    """JAX's own fix-up (shift left across the batch, add b*T, times the token stride) turns
    packed_rows' [B,M+1] offsets into cuDNN's ragged offsets: every segment, in order,
    at element (b*T + start) * N*H, then the end marker; lengths 0 past the last."""
    from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets
    ids = segments("packed")
    q = jnp.zeros((B, T, N, H), jnp.bfloat16)
    k = jnp.zeros((B, T, N, H), jnp.bfloat16)  # K/V heads repeated to N, as the kernel does
    lengths, offsets, ok = cudnn.packed_rows(ids, 4)
    assert np.all(ok)
    seqlen, _, q_off, kv_off = _fix_seqlen_offsets(lengths, lengths, offsets, offsets, q, k)
    runs = [(b, s, n) for b, row in enumerate(np.asarray(ids)) for s, n, _ in np_runs(row)]
    want_off = np.full(B * 5, B * T * N * H)
    want_off[:len(runs)] = [(b * T + s) * N * H for b, s, _ in runs]
    want_len = np.zeros(B * 4, np.int32)
    want_len[:len(runs)] = [n for _, _, n in runs]
    np.testing.assert_array_equal(np.asarray(q_off).ravel(), want_off)
    np.testing.assert_array_equal(np.asarray(kv_off).ravel(), want_off)
    np.testing.assert_array_equal(np.asarray(seqlen).ravel(), want_len)


def test_jax_0_10_2_strides_kv_offsets_by_the_query_heads():
    """Why the kernel repeats K/V heads for packed rows: with K < N key heads, JAX 0.10.2
    scales the KV offsets by N*H, not K*H (fixed upstream by jax PR #39521). When this
    fails, JAX is fixed and the repeat in causal_attention can go."""
    from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets
    lengths, offsets, _ = cudnn.packed_rows(segments("packed"), 4)
    q = jnp.zeros((B, T, N, H), jnp.bfloat16)
    k = jnp.zeros((B, T, K, H), jnp.bfloat16)
    _, _, q_off, kv_off = _fix_seqlen_offsets(lengths, lengths, offsets, offsets, q, k)
    np.testing.assert_array_equal(kv_off, q_off)   # the query's stride for both


def _operand_types(line: str) -> list[str]:
    return re.findall(r"tensor<([^>]*)>", line.split(" : (", 1)[1].split(") ->", 1)[0])


@pytest.mark.parametrize("kind, mask, max_seg, kv_heads, lengths", [
    ("none", "CAUSAL", 1, K, []),
    ("padded", "PADDING_CAUSAL", 1, K, [f"{B}xi32"] * 2),
    ("packed", "PADDING_CAUSAL", 4, N, [f"{B}x4xi32"] * 2 + [f"{B}x5xi32"] * 2),
])
def test_lowers_to_the_cudnn_custom_calls(monkeypatch, kind, mask, max_seg, kv_heads, lengths):
    """Forward and backward lower for CUDA (on this CPU host) to cuDNN's fused attention
    custom calls with the mask type, lengths and offsets meant, and no [T,T] operand.
    The cuDNN version probe and the Hopper check need a GPU, so they are stubbed."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    ids = segments(kind)
    q, k, v, w = inputs(jnp.bfloat16, ids)
    extra = {"layout": "packed", "max_segments": 4} if kind == "packed" else {}
    loss = lambda q, k, v: jnp.sum(cudnn.causal_attention(q, k, v, ids, **extra) * w)
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = {re.search(r"@(__cudnn\$\w+)\(", line).group(1): line
             for line in text.splitlines() if "custom_call @__cudnn" in line}
    assert sorted(calls) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    qkv = [f"{B}x{T}x{N}x{H}xbf16"] + [f"{B}x{T}x{kv_heads}x{H}xbf16"] * 2
    assert _operand_types(calls["__cudnn$fmhaSoftmax"]) == qkv + lengths
    backward = _operand_types(calls["__cudnn$fmhaSoftmaxBackward"])
    assert backward[:3] == qkv and backward[3] == f"{B * max_seg}x{N}x{T}xf32"  # softmax stats
    assert backward[len(backward) - len(lengths):] == lengths
    for line in calls.values():
        assert f"\\22mask_type\\22: \\22{mask}\\22" in line
        assert f"\\22max_seg_per_batch\\22: {max_seg}," in line
        assert f"{T}x{T}" not in line.split(" : (", 1)[1]


@pytest.mark.parametrize("args, ok, words", [
    (("none", jnp.bfloat16, 128, (8, 0)), True, ""),
    (("padded", jnp.float16, 64, (8, 6)), True, ""),
    (("packed", jnp.bfloat16, 128, (9, 0)), True, ""),
    (("packed", jnp.bfloat16, 128, (10, 0)), True, ""),
    (("packed", jnp.bfloat16, 128, (8, 0)), False, "Hopper"),
    (("none", jnp.float32, 128, (9, 0)), False, "not float32"),
    (("none", jnp.bfloat16, 256, (8, 0)), False, "<= 128"),
    (("none", jnp.bfloat16, 256, (9, 0)), True, ""),
    (("none", jnp.bfloat16, 100, (9, 0)), False, "multiples of 8"),
    (("padded", jnp.bfloat16, 128, (7, 5)), False, "Ampere"),
])
def test_supports(args, ok, words):
    got, why = cudnn.supports(*args)
    assert got is ok and words in why and (ok or why.endswith("XLA attention runs instead"))


def test_refusals():
    if jax.default_backend() == "cpu":
        assert cudnn.available() == (False, "no GPU backend (JAX runs on cpu)")
    with pytest.raises(ValueError, match="segments must be one of"):
        cudnn.supports("ragged")
    q, k, v, _ = inputs(jnp.float32, None)
    with pytest.raises(UserError, match="got float32") as err:
        cudnn.causal_attention(q, k, v, None)
    assert "\n" not in str(err.value)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="max_segments >= 2"):
        cudnn.causal_attention(q, k, v, segments("packed"), layout="packed")
    with pytest.raises(ValueError, match="needs segment ids"):
        cudnn.causal_attention(q, k, v, None, layout="padded")
    with pytest.raises(ValueError, match="self-attention"):
        cudnn.causal_attention(q, k[:, :128], v[:, :128], None)


# ---- the real kernel (GPU) ----------------------------------------------------------------
def assert_close(got, want, mask=None):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if mask is not None:
        got, want = got[mask], want[mask]
    err = np.abs(got - want)
    rel_rms = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel_rms <= 5e-3 and err.max() <= 1e-2 * np.abs(want).max(), (
        f"relative RMS {rel_rms:.2e}, max error {err.max():.2e} of max {np.abs(want).max():.2f}")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["none", "padded", "packed"])
def test_cudnn_equals_reference(kind, dtype):
    ok, why = cudnn.available()
    assert ok, why
    ok, why = cudnn.supports(kind, dtype, H)
    if not ok:
        pytest.skip(why)
    ids = segments(kind)
    q, k, v, w = inputs(dtype, ids)
    extra = {"layout": "packed", "max_segments": 4} if kind == "packed" else {}
    out, grads = value_and_grads(
        lambda q, k, v: cudnn.causal_attention(q, k, v, ids, **extra), q, k, v, w)
    with jax.default_matmul_precision("highest"):  # a float32 reference, no TF32
        ref, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, ids), q, k, v, w)
    assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
    real = np.ones((B, T), bool) if ids is None else np.asarray(ids != 0)
    assert_close(out, ref, real)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, want)


@gpu
@needs_gpu
def test_cudnn_packed_poisons_rows_with_too_many_segments():
    if not cudnn.supports("packed")[0]:
        pytest.skip(cudnn.supports("packed")[1])
    ids = np.asarray(segments("packed")).copy()
    ids[2] = np.repeat(np.arange(1, 9), T // 8)   # 8 runs > max_segments=4
    q, k, v, _ = inputs(jnp.bfloat16, None)
    out = np.asarray(cudnn.causal_attention(q, k, v, jnp.asarray(ids), layout="packed",
                                            max_segments=4), np.float32)
    assert np.all(np.isnan(out[2])) and np.all(np.isfinite(out[[0, 1, 3]]))


@gpu
@needs_gpu
def test_cudnn_refuses_float32():
    assert not cudnn.supports("none", jnp.float32)[0]
    q, k, v, _ = inputs(jnp.float32, None)
    with pytest.raises(UserError, match="float32"):
        cudnn.causal_attention(q, k, v, None)
