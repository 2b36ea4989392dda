"""Next-token selection: greedy, temperature, top-k, top-p, as pure functions.

:class:`Sampling` is a small frozen (hashable) dataclass, a static argument of the
jitted decode loop. Randomness comes only from per-row keys that the engine derives
from (seed, row seed, token index), never from the batch layout or the mesh: with
JAX's partitionable threefry the same key gives the same bits however the logits are
sharded, so a fixed seed gives the same tokens on 1 device or on a ``data x tensor``
mesh, and a prompt gets the same sample whichever batch it lands in.

The order follows transformers: temperature, then top-k, then top-p.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from meditron_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 means greedy (argmax); ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"--top-k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        return sample(logits, keys, self)


def mask_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep logits >= the k-th largest per row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def mask_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filtering: keep the most likely tokens whose cumulative probability
    first reaches ``p`` (a token is kept iff the mass of strictly more likely tokens is
    below ``p``; the most likely token is always kept)."""
    if p >= 1.0:
        return logits
    ordered = jnp.sort(logits, axis=-1, descending=True)
    probs = jax.nn.softmax(ordered.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row: logits [B, V] (float32), keys [B] typed PRNG keys -> [B] int32.
    A padded vocabulary's extra columns arrive as -inf (model.logits_from_hidden): every
    step below keeps them at probability 0, so they are never drawn."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.float32(sampling.temperature)
    scaled = mask_top_k(scaled, sampling.top_k)
    scaled = mask_top_p(scaled, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
