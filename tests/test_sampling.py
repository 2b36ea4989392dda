"""Sampling: top-k / top-p never leave their allowed sets (property test against an
independent float64 definition), greedy is argmax, sampling follows the softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from infer.sampling import Sampling, mask_top_k, mask_top_p, sample

B, V = 4, 32


def _keys(seed: int, n: int = B):
    return jax.random.split(jax.random.key(seed), n)


def allowed_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Token allowed iff fewer than k tokens have a strictly larger logit."""
    greater = (logits[:, None, :] > logits[:, :, None]).sum(-1)
    return greater < k


def allowed_top_p(logits: np.ndarray, p: float, tol: float = 1e-5) -> np.ndarray:
    """Token allowed iff the probability mass of strictly more likely tokens is < p
    (tol absorbs float32 vs float64 cumulative sums at the boundary)."""
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mass_above = ((x[:, None, :] > x[:, :, None]) * probs[:, None, :]).sum(-1)
    return mass_above < p + tol


# No subnormals: XLA on CPU flushes them to zero, a float edge no real logit reaches.
logit_rows = st.lists(st.floats(-8, 8, allow_nan=False, allow_subnormal=False, width=32),
                      min_size=B * V, max_size=B * V).map(lambda v: np.asarray(v, np.float32).reshape(B, V))


@settings(max_examples=40, deadline=None)
@given(logits=logit_rows, k=st.integers(1, V), p=st.floats(0.01, 1.0),
       temperature=st.sampled_from([0.3, 1.0, 2.5]), seed=st.integers(0, 2**31 - 1))
def test_top_k_top_p_never_emit_outside_the_allowed_set(logits, k, p, temperature, seed):
    scaled = logits / np.float32(temperature)
    for sampling, allowed in [
        (Sampling(temperature, top_k=k), allowed_top_k(scaled, k)),
        (Sampling(temperature, top_p=p), allowed_top_p(scaled, p)),
        (Sampling(temperature, top_k=k, top_p=p),
         allowed_top_k(scaled, k) & allowed_top_p(
             np.where(allowed_top_k(scaled, k), scaled, -np.inf), p)),
    ]:
        tokens = np.asarray(sample(jnp.asarray(logits), _keys(seed), sampling))
        assert allowed[np.arange(B), tokens].all(), (sampling, tokens)


@settings(max_examples=25, deadline=None)
@given(logits=logit_rows, k=st.integers(1, V), p=st.floats(0.01, 1.0))
def test_masks_keep_exactly_the_allowed_set(logits, k, p):
    kept_k = np.isfinite(np.asarray(mask_top_k(jnp.asarray(logits), k)))
    np.testing.assert_array_equal(kept_k, allowed_top_k(logits, k))
    kept_p = np.isfinite(np.asarray(mask_top_p(jnp.asarray(logits), p)))
    strict = allowed_top_p(logits, p, tol=-1e-5)      # clearly inside
    assert (kept_p >= strict).all() and (kept_p <= allowed_top_p(logits, p)).all()
    assert kept_p[np.arange(B), logits.argmax(-1)].all()   # the best token always stays


def test_greedy_is_argmax_and_ignores_keys():
    logits = jax.random.normal(jax.random.key(0), (B, V))
    a = sample(logits, _keys(1), Sampling())
    b = sample(logits, _keys(2), Sampling())
    np.testing.assert_array_equal(a, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(a, b)


def test_temperature_sampling_follows_the_softmax():
    """8192 draws from one row: frequencies match softmax(logits / T) within 4 sigma."""
    logits = jnp.asarray([2.0, 1.0, 0.0, -1.0, 0.5, -3.0], jnp.float32)
    n, temperature = 8192, 0.7
    draws = sample(jnp.broadcast_to(logits, (n, 6)), _keys(3, n), Sampling(temperature))
    freq = np.bincount(np.asarray(draws), minlength=6) / n
    want = np.asarray(jax.nn.softmax(logits / temperature))
    sigma = np.sqrt(want * (1 - want) / n)
    assert (np.abs(freq - want) < 4 * sigma + 1e-9).all(), (freq, want)


def test_same_key_same_token_under_jit_and_sharding():
    """Keys, not layout, decide the sample: eager == jit == vocab/batch-sharded jit."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    import sharding
    logits = jax.random.normal(jax.random.key(4), (8, 64))
    s = Sampling(1.0, top_k=10, top_p=0.9)
    eager = sample(logits, _keys(5, 8), s)
    mesh = sharding.make_mesh("data=4,tensor=2")
    sharded = jax.device_put(logits, NamedSharding(mesh, P("data", "tensor")))
    jitted = jax.jit(lambda x, k: sample(x, k, s))(sharded, _keys(5, 8))
    np.testing.assert_array_equal(eager, jitted)
