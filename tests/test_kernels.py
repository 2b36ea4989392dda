"""The kernel dispatch (meditron_jax.kernels): XLA's attention against an independent one,
the forward with the splash kernel (Pallas interpret mode) against the forward with XLA,
prefill through the causal kernel path against prefill over the whole cache, and the
choice: automatic per platform, explicit, refused with one line where it cannot run."""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA, Kernels, select, xla
from meditron_jax.model import cross_entropy, forward, init_params
from meditron_jax.model.config import preset
from meditron_jax.model.kvcache import KVCache
from sharding import INFER_RULES, TRAIN_RULES, make_mesh, step_kernels
from tests.attention_reference import reference_attention

CFG = dataclasses.replace(preset("tiny"), num_attention_heads=8, num_key_value_heads=2,
                          head_dim=8)


def _segments(b, t, seed):
    """Packed rows: random segment lengths, trailing padding (0) on odd rows."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, s = 0, 1
        end = t - (rng.integers(1, t // 4) if r % 2 else 0)
        while pos < end:
            n = int(rng.integers(1, t // 2))
            seg[r, pos:min(end, pos + n)] = s
            pos, s = pos + n, s + 1
    return jnp.asarray(seg)


def _qkv(b, t, n, kv, h, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, t, heads, h)) for kk, heads in
               zip(ks[:3], (n, kv, kv)))
    return q, k, v, jax.random.normal(ks[3], (b, t, n, h))


@pytest.mark.parametrize("t, chunks", [(64, 4), (48, 4), (30, 4), (64, 1)])
def test_xla_causal_attention_equals_the_definition(t, chunks):
    q, k, v, w = _qkv(3, t, 8, 2, 16)
    seg = _segments(3, t, t)

    def value_and_grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
            q, k, v)
    got = value_and_grads(lambda q, k, v: xla.causal_attention(q, k, v, seg, chunks))
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, seg))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_xla_cached_attention_reads_the_head_major_cache():
    q, k, v, _ = _qkv(2, 40, 8, 2, 16, seed=1)
    seg = _segments(2, 40, 3)
    slots = jnp.arange(40)
    mask = ((slots[None, :] <= slots[:, None])[None]
            & (seg[:, :, None] == seg[:, None, :]))[:, None]
    got = jax.jit(xla.cached_attention)(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(jax.jit(reference_attention)(q, k, v, seg)),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), std=0.3)


def _tokens(b, t, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)),
                       jnp.int32)


def _loss_and_grads(params, tokens, segments, kernels, jit=jax.jit):
    def loss(p):
        logits, _ = forward(p, tokens, CFG, segment_ids=segments, kernels=kernels)
        return cross_entropy(logits[:, :-1], tokens[:, 1:], (segments[:, 1:] > 0))[0], logits
    return jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_same(got, want, tol=1e-5):
    (l1, logits1), g1 = got
    (l0, logits0), g0 = want
    np.testing.assert_allclose(float(l1), float(l0), rtol=tol)
    np.testing.assert_allclose(np.asarray(logits1), np.asarray(logits0), atol=tol * 10)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol * np.abs(b).max())


def test_forward_with_splash_equals_xla_logits_and_gradients(params):
    """The model with the TPU kernel (Pallas interpret mode on CPU) equals the XLA path:
    packed segments, GQA 8/2, float32, loss, logits and every weight's gradient."""
    tokens, seg = _tokens(2, 128, 0), _segments(2, 128, 7)
    splash = Kernels("splash", "test", interpret=True)
    _assert_same(_loss_and_grads(params, tokens, seg, splash),
                 _loss_and_grads(params, tokens, seg, XLA))


def test_splash_through_the_step_kernels_on_a_mesh(params):
    """``step_kernels`` splits splash over the mesh's batch and head axes like the
    activations (data=2, tensor=2 under the training rules): equal to one device's XLA."""
    mesh = make_mesh("data=2,tensor=2", jax.devices()[:4])
    kernels = step_kernels("splash", mesh, TRAIN_RULES, interpret=True)
    assert (kernels.attention, kernels.batch_axes, kernels.head_axis) == (
        "splash", ("data",), "tensor")
    tokens, seg = _tokens(2, 128, 1), _segments(2, 128, 8)
    _assert_same(_loss_and_grads(params, tokens, seg, kernels),
                 _loss_and_grads(params, tokens, seg, XLA))


def test_prefill_through_the_causal_path_equals_attending_over_the_cache(params):
    """``prefill=True`` (self-attention within the prompt, then stored) gives the same
    logits and cache as attending over the whole empty cache, with left padding."""
    tokens = _tokens(2, 12, 2)
    seg = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12], jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    run = jax.jit(lambda p, prefill: forward(p, tokens, CFG, positions=pos, segment_ids=seg,
                                             cache=KVCache.init(CFG, 2, 20), prefill=prefill),
                  static_argnums=1)
    (a, ca), (b, cb) = run(params, True), run(params, False)
    real = np.asarray(seg, bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)
    for x, y in zip((ca.k, ca.v, ca.segment_ids, ca.index), (cb.k, cb.v, cb.segment_ids, cb.index)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_the_choice_is_made_once_logged_and_refused_in_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="meditron_jax.kernels"):
        assert select("auto") == Kernels("xla", "auto on cpu")
    assert "kernels: attention xla (auto on cpu)" in caplog.text
    assert select("auto", platform="tpu").attention == "splash"
    assert select("xla", platform="tpu").record() == {"attention": "xla", "reason": "requested"}
    for choice, want in (("splash", "--attention splash is a TPU kernel and this run is on cpu"),
                         ("cudnn", "--attention cudnn needs a GPU and this run is on cpu"),
                         ("flash", "unknown attention 'flash'; choose one of auto, xla, splash, "
                                   "cudnn")):
        with pytest.raises(UserError) as err:
            select(choice)
        assert str(err.value).startswith(want) and "\n" not in str(err.value)
    mesh = make_mesh("data=2,tensor=4")
    assert step_kernels("auto", mesh, INFER_RULES).attention == "xla"  # CPU devices


def test_an_unsupported_length_falls_back_to_xla_with_a_warning(params, caplog):
    tokens = _tokens(1, 40, 3)  # not a multiple of 128
    with caplog.at_level(logging.WARNING, logger="meditron_jax.kernels"):
        got, _ = forward(params, tokens, CFG, kernels=Kernels("splash", "test", interpret=True))
    assert "XLA attention runs for length 40" in caplog.text
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(params, tokens, CFG)[0]),
                               atol=1e-5)


def test_xla_causal_attention_in_bfloat16_stays_within_its_rounding():
    q, k, v, _ = _qkv(2, 64, 8, 2, 16, seed=5)
    seg = _segments(2, 64, 9)
    out = jax.jit(xla.causal_attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(jax.jit(reference_attention)(q, k, v, seg)), atol=0.05)
