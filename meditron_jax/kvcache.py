"""The KV cache: a plain pytree value, returned by every forward and donated by callers.

Layout ``[layers, batch, max_len, kv_heads, head_dim]``: the layer axis leads so the
scanned decoder writes layer ``i`` with one ``dynamic_update_slice`` into the carried
buffer (in place under donation), and ``kv_heads`` sits where tensor parallelism
shards it, matching the k/v projection weights.

With unstacked layers (``model.unstack_layers``, the CPU decode layout) the cache
holds a tuple of per-layer head-major ``[batch * kv_heads, max_len, head_dim]``
buffers instead (``model.per_layer_cache``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from meditron_jax.config import LlamaConfig

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array            # [L, B, S, K, H]
    v: jax.Array            # [L, B, S, K, H]
    segment_ids: jax.Array  # [B, S] int32; 0 marks padding / empty slots
    index: jax.Array        # [] int32; slots filled so far (shared by all rows)

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int,
             dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        # stacked [L,B,S,K,H]; per layer [B*K,S,H] (model.per_layer_cache)
        if isinstance(self.k, (list, tuple)):
            return self.k[0].shape[1]
        return self.k.shape[2]

    @staticmethod
    def logical_axes() -> "KVCache":
        return KVCache(k=CACHE_AXES, v=CACHE_AXES, segment_ids=("batch", "seq"), index=())
