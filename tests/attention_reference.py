"""An independent attention for the kernel tests: written from the definition, in float32
numpy-style einsums, sharing no code with meditron_jax.kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def reference_attention(q, k, v, segment_ids=None):
    """q [B,T,N,H], k/v [B,T,K,H]; key j visible to query i iff j <= i and both share a
    segment (0 = padding, whose own rows are whatever the definition gives) -> [B,T,N,H]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    # query head i reads key head i // (n // kv): repeat each key head n // kv times
    k = jnp.repeat(k, n // kv, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, n // kv, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k) / np.sqrt(h)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (j <= i)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    logits = jnp.where(visible[:, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v).astype(q.dtype)
