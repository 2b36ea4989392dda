"""The KV cache: a plain pytree value, returned by every forward and donated by callers.

One layout, ``[layers, batch, kv_heads, max_len, head_dim]``, on every backend: the
layer axis leads so the decoder writes layer ``i`` with one ``dynamic_update_slice``
into the carried buffer (in place under donation); keys are head-major, so each head's
[S, H] block is contiguous and attention's products read it in place (no transposed
operand; the [S, K] order made XLA:CPU transpose the whole cache every step); the heads
dim is where tensor parallelism shards it (logical name ``cache_heads``).

The cache may hold each KV head several times (``heads`` a multiple of the model's
KV heads, each repeated in place: head ``j`` is the model's ``j // repeat``), which the
forward reads off the cache's shape. A mesh whose tensor axis the KV heads do not
divide (MQA; the 8B's 8 on tensor=16) replicates the small k/v weights, but sharding a
cache of ``lcm(kv heads, tensor)`` heads keeps one head's slots per device instead
of every head's (``sharding.rules.cache_heads``), as vLLM does.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from meditron_jax.model.config import LlamaConfig

CACHE_AXES = ("layers", "batch", "cache_heads", "seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array            # [L, B, K, S, H]
    v: jax.Array            # [L, B, K, S, H]
    segment_ids: jax.Array  # [B, S] int32; 0 marks padding / empty slots
    index: jax.Array        # [] int32 slots filled so far, shared by all rows (left-padded
                            # batches), or [B] int32 one per row (continuous batching)

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int,
             dtype=jnp.float32, heads: int | None = None) -> "KVCache":
        """An empty cache; ``heads`` (default the model's KV heads) a multiple of them."""
        heads = heads or cfg.num_key_value_heads
        if heads % cfg.num_key_value_heads:
            raise ValueError(f"cache heads {heads} must be a multiple of the model's "
                             f"{cfg.num_key_value_heads} kv heads")
        shape = (cfg.num_hidden_layers, batch, heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def heads(self) -> int:
        return self.k.shape[2]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def logical_axes() -> "KVCache":
        return KVCache(k=CACHE_AXES, v=CACHE_AXES, segment_ids=("batch", "seq"), index=())


def write_slots(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """``buffer`` [B, S, ...] with ``new`` [B, T, ...] written at slots ``start ...``:
    ``start`` is one slot for every row ([]) or one per row ([B])."""
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, start) + (0,) * (buffer.ndim - 2))
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(
        b, n, (s,) + (0,) * (b.ndim - 1)))(buffer, new, start)


def write_layer(cache: jax.Array, new: jax.Array, layer, start: jax.Array) -> jax.Array:
    """Layer ``layer`` of ``cache`` [L, B, K, S, H] with ``new`` [B, K, T, H] written at
    slots ``start ...`` (shared [] or per row [B]); writes past the end are dropped.

    One scatter indexed by (layer, row, slot), for a shared start too. A
    ``dynamic_update_slice`` here let XLA fuse the attention's read of the layer with the
    write (recomputing it from the old buffer), which kept the old buffer live and made
    the in-place write a copy of the whole key cache at every layer of every decode step
    (XLA:CPU: 85 -> 49 ms per step at 8 x 384 slots on ``small``; TPU v5e, the 8B at
    8 x 4096 on tensor=8: temporaries 0.50 GiB -> 129 MiB); a ``vmap`` of it over the
    batch axis kept the cache batch-major, copying it twice per step (bench/NOTES.md
    section 26)."""
    b, _, t, _ = new.shape
    rows = jnp.arange(b)[:, None]
    slots = jnp.broadcast_to(start, (b,))[:, None] + jnp.arange(t)[None, :]
    return cache.at[layer, rows, :, slots].set(new.swapaxes(1, 2), mode="drop")
