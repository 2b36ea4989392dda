"""Pallas TPU splash attention (meditron_jax.kernels.splash) against a plain einsum
reference: on CPU through Pallas' interpreter (forward and q/k/v gradients, float32,
1e-5), alone and inside shard_map, packed segments, padding, GQA; and compiled ahead
of time for a v5e-8 slice, where its temporaries are compared with XLA attention's.
About 40 s on 2 idle cores (interpreted kernels: ~3 s per gradient case; the two TPU
compiles ~15 s)."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meditron_jax.errors import UserError
from meditron_jax.kernels.splash import splash_attention
from meditron_jax.kernels.xla import cached_attention, self_mask
from tests.attention_reference import reference_attention
from sharding import make_mesh

B, H = 2, 64


def _inputs(t: int, n: int, kv: int, packed: bool):
    kq, kk, kv_, kw = jax.random.split(jax.random.key(t + n + kv), 4)
    q = jax.random.normal(kq, (B, t, n, H), jnp.float32)
    k = jax.random.normal(kk, (B, t, kv, H), jnp.float32)
    v = jax.random.normal(kv_, (B, t, kv, H), jnp.float32)
    weights = jax.random.normal(kw, (B, t, n, H), jnp.float32)
    segments = np.ones((B, t), np.int32)
    if packed:  # row 0: two documents then right padding; row 1: left padding, one document
        segments[0, 100:200], segments[0, 200:] = 2, 0
        segments[1, :30] = 0
    return q, k, v, weights, jnp.asarray(segments)


def _value_and_grads(fn, q, k, v, weights):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
        q, k, v)


def _reference(q, k, v, weights, segments):
    return _value_and_grads(lambda q, k, v: reference_attention(q, k, v, segments), q, k, v,
                            weights)


@pytest.mark.parametrize("t, n, kv, packed, mesh", [
    (256, 4, 2, True, None),                  # GQA, two documents, padding on both sides
    (128, 4, 4, False, None),                 # MHA, one segment (segment_ids=None)
    (256, 4, 2, True, "data=2,tensor=2"),     # batch and heads split, KV heads split
    (256, 4, 2, True, "fsdp=2,tensor=4"),     # 2 KV heads on tensor=4: replicated KV
])
def test_equals_einsum_attention(t, n, kv, packed, mesh):
    q, k, v, weights, segments = _inputs(t, n, kv, packed)
    mesh = make_mesh(mesh) if mesh else None
    out, grads = _value_and_grads(
        lambda q, k, v: splash_attention(q, k, v, segments if packed else None, mesh=mesh,
                                         block=128, interpret=True), q, k, v, weights)
    want_out, want_grads = _reference(q, k, v, weights, segments)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=0)
    for name, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"d{name}")
    if packed:  # the segments change the answer, so the comparison above tests them
        unpacked, _ = _reference(q, k, v, weights, jnp.ones_like(segments))
        assert np.abs(np.asarray(unpacked - want_out)).max() > 0.1


def test_bad_shapes_are_one_line_errors():
    q, k, v, _, segments = _inputs(128, 4, 2, False)
    with pytest.raises(UserError, match="multiple of 128; got 96"):
        splash_attention(q[:, :96], k[:, :96], v[:, :96], segments[:, :96], interpret=True)
    with pytest.raises(UserError, match="4 query heads do not split over mesh axis tensor=8"):
        splash_attention(q, k, v, segments, mesh=make_mesh("tensor=8"), interpret=True)
    with pytest.raises(UserError, match=r"batch 2 does not split over mesh axes data\*fsdp = 4"):
        splash_attention(q, k, v, segments, mesh=make_mesh("data=2,fsdp=2,tensor=2"),
                         interpret=True)
    with pytest.raises(UserError, match="3 KV heads neither split over nor divide mesh axis "
                                        "tensor=2"):
        k3 = jnp.zeros((B, 128, 3, H))
        splash_attention(jnp.zeros((B, 128, 6, H)), k3, k3, segments,
                         mesh=make_mesh("tensor=2"), interpret=True)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'meditron-jax[tpu]')")
def test_compiles_for_tpu_without_attention_temporaries():
    """Forward + backward at 8 x 8192 tokens, 8 query / 2 KV heads, bf16, on v5e-8 with
    fsdp=4,tensor=2: splash needs ~1 MiB of temporaries per device, XLA attention 4 GiB
    (the [T, S] float32 logits of 2 rows x 4 heads, and their gradient)."""
    from sharding.aot import compile_plan, resolve_target
    target = resolve_target("tpu:v5e:2x4")
    mesh = make_mesh("fsdp=4,tensor=2", devices=list(target.devices))
    b, t, n, kv, h = 8, 8192, 8, 2, 128
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    args = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=heads),
            jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16, sharding=heads),
            jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16, sharding=heads),
            jax.ShapeDtypeStruct((b, t), jnp.int32,
                                 sharding=NamedSharding(mesh, P(("data", "fsdp")))))

    def xla(q, k, v, segments):
        # XLA attention over the whole [T, S] (no query chunks)
        return cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), self_mask(segments))

    def step(fn):
        loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s).astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    splash = compile_plan(step(lambda *a: splash_attention(*a, mesh=mesh)), args, target)
    plain = compile_plan(step(xla), args, target)
    print(f"\nper-device temporaries, fwd+bwd 8x8192, 8 heads, v5e-8 fsdp=4,tensor=2: "
          f"splash {splash.temporaries / 2**20:.1f} MiB, XLA {plain.temporaries / 2**30:.2f} GiB")
    assert splash.fits and plain.fits
    assert splash.temporaries < 16 * 2 ** 20 and plain.temporaries > 2 * 2 ** 30
