"""The KV cache: a plain pytree value, returned by every forward and donated by callers.

Layout ``[layers, batch, max_len, kv_heads, head_dim]``: the layer axis leads so the
scanned decoder writes layer ``i`` with one ``dynamic_update_slice`` into the carried
buffer (in place under donation), and the heads dim sits where tensor parallelism
shards it (logical name ``cache_heads``).

The cache may hold each KV head several times (``heads`` a multiple of the model's
KV heads, each repeated in place: head ``j`` is the model's ``j // repeat``), which the
forward reads off the cache's shape. A mesh whose tensor axis the KV heads do not
divide (MQA; the 8B's 8 on tensor=16) replicates the small k/v weights, but sharding a
cache of ``lcm(kv heads, tensor)`` heads keeps one head's slots per device instead
of every head's (``sharding.rules.cache_heads``), as vLLM does.

With unstacked layers (``model.unstack_layers``, the CPU decode layout) the cache
holds a tuple of per-layer head-major ``[batch * kv_heads, max_len, head_dim]``
buffers instead (``model.per_layer_cache``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from meditron_jax.config import LlamaConfig

CACHE_AXES = ("layers", "batch", "seq", "cache_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array            # [L, B, S, K, H]
    v: jax.Array            # [L, B, S, K, H]
    segment_ids: jax.Array  # [B, S] int32; 0 marks padding / empty slots
    index: jax.Array        # [] int32; slots filled so far (shared by all rows)

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int,
             dtype=jnp.float32, heads: int | None = None) -> "KVCache":
        """An empty cache; ``heads`` (default the model's KV heads) a multiple of them."""
        heads = heads or cfg.num_key_value_heads
        if heads % cfg.num_key_value_heads:
            raise ValueError(f"cache heads {heads} must be a multiple of the model's "
                             f"{cfg.num_key_value_heads} kv heads")
        shape = (cfg.num_hidden_layers, batch, max_len, heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def heads(self) -> int:
        # stacked [L,B,S,K,H]; per layer [B*K,S,H]
        if isinstance(self.k, (list, tuple)):
            return self.k[0].shape[0] // self.segment_ids.shape[0]
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        # stacked [L,B,S,K,H]; per layer [B*K,S,H] (model.per_layer_cache)
        if isinstance(self.k, (list, tuple)):
            return self.k[0].shape[1]
        return self.k.shape[2]

    @staticmethod
    def logical_axes() -> "KVCache":
        return KVCache(k=CACHE_AXES, v=CACHE_AXES, segment_ids=("batch", "seq"), index=())
