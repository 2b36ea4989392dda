"""Running a loaded model in fixed-shape batches on a mesh (or one device).

Shared by generation (:mod:`infer.engine`) and scoring (:mod:`infer.score`): where
arrays live (the inference rule table over ``--mesh``), host <-> device transfers that
also work on a multi-host pod, length buckets, and one cache of jitted functions per
(config, mesh, rules, settings), so every runner built in a process reuses executables.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.io.loading import LoadedModel
from meditron_jax.kernels import select
from meditron_jax.model.quant import is_quantized
from sharding import (INFER_RULES, Rules, activation_constrainer, cache_heads, check_batch,
                      check_model_fits, param_shardings, step_kernels, tree_shardings)

PAD_ID = 0
MIN_BUCKET = 16


def bucket_length(n: int, *, minimum: int = MIN_BUCKET, cap: int | None = None) -> int:
    """Next power of two >= n (at least ``minimum``), clipped to ``cap``."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return min(size, cap) if cap is not None else size


def cache_length(n: int, *, cap: int | None = None) -> int:
    """The decode cache's slots for ``n`` tokens: the next of 2^k and 1.5 * 2^k (at least
    MIN_BUCKET), clipped to ``cap``. Every decode step attends over every slot, so the
    half-steps cut the worst case of unused slots from 1/2 to 1/3 (prompt 128 + 64 new
    tokens: 192 slots, not 256) for at most twice the compiled cache shapes."""
    size = bucket_length(n, cap=None)
    if size >= 2 * MIN_BUCKET and n <= size * 3 // 4:
        size = size * 3 // 4
    return min(size, cap) if cap is not None else size


class Placement:
    """Where arrays live: the mesh + rule table, or the default device when no mesh.

    Host arrays go in with ``make_array_from_callback`` (each process supplies only its
    addressable shards, so this also works on a multi-host pod) and come back with a
    process all-gather when not fully addressable.
    """

    def __init__(self, cfg: LlamaConfig, mesh: Mesh | None, rules: Rules = INFER_RULES,
                 quantize: str | None = None):
        # KV heads the mesh cannot split: replicated weights, a cache of repeated heads;
        # quantize ("int8"): the params are model.quant's tree (int8 values + scales)
        self.cfg, self.mesh, self.quantize = cfg, mesh, quantize
        self.rules = rules if mesh is None else rules.for_model(cfg, mesh)
        self.cache_heads = (cfg.num_key_value_heads if mesh is None
                            else cache_heads(cfg, mesh, self.rules))
        self.constrain = activation_constrainer(mesh, self.rules) if mesh is not None else None

    def sharding(self, axes: tuple):
        return None if self.mesh is None else self.rules.sharding(self.mesh, axes)

    def tree(self, axes_tree):
        return None if self.mesh is None else tree_shardings(axes_tree, self.mesh, self.rules)

    def params(self):
        return None if self.mesh is None else param_shardings(self.cfg, self.mesh, self.rules,
                                                              self.quantize)

    def put(self, array: np.ndarray, axes: tuple) -> jax.Array:
        array = np.asarray(array)
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.make_array_from_callback(array.shape, self.sharding(axes),
                                            lambda index: array[index])

    def check_fits(self, batch_size: int) -> None:
        """The model's dims and the batch divide over the mesh (clear errors early)."""
        if self.mesh is not None:
            check_model_fits(self.cfg, self.mesh, self.rules)
            check_batch(batch_size, self.mesh, self.rules)


def to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# Jitted functions shared by every runner with the same (config, mesh, rules, settings):
# a command, the demo or an evaluation that builds several runners in one process
# compiles each shape once. Small: an entry holds executables, not weights.
_JITTED: dict[tuple, Callable] = {}
_JITTED_MAX = 64


class BatchRunner:
    """A loaded (possibly sharded) model run ``batch_size`` rows at a time: a short
    last batch is filled with idle rows, so every batch has one shape; with a mesh the
    batch must divide by the ``data`` axis. Compute dtype defaults to the weights'."""

    def __init__(self, model: LoadedModel, mesh: Mesh | None = None, batch_size: int = 8, *,
                 rules: Rules = INFER_RULES, dtype=None, attention: str = "auto"):
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.model, self.cfg, self.batch_size = model, model.cfg, batch_size
        # int8 weights (model.quant): their tree has its own shardings and executables
        self.quantize = "int8" if any(is_quantized(x) for x in jax.tree.leaves(
            model.params["layers"], is_leaf=is_quantized)) else None
        self.placement = Placement(model.cfg, mesh, rules, self.quantize)
        self.placement.check_fits(batch_size)
        self.dtype = dtype or model.params["embed"].dtype
        # chosen once per runner and logged (meditron_jax.kernels)
        facts = dict(dtype=self.dtype, head_dim=model.cfg.head_dim)
        self.kernels = (select(attention, **facts) if mesh is None
                        else step_kernels(attention, mesh, rules, **facts))
        # A no-op when the model was loaded into these shardings (the usual case).
        shardings = self.placement.params()
        self.params = model.params if shardings is None else jax.device_put(model.params,
                                                                            shardings)

    def jitted(self, *key, build: Callable[[], Callable]) -> Callable:
        """The jitted function for ``key`` under this runner's settings, built once."""
        rules = self.placement.rules
        full = (self.cfg, self.placement.mesh, rules.name, tuple(sorted(rules.table.items())),
                jnp.dtype(self.dtype).name, self.kernels, self.quantize) + key
        if full not in _JITTED:
            if len(_JITTED) >= _JITTED_MAX:
                _JITTED.pop(next(iter(_JITTED)))
            _JITTED[full] = build()
        return _JITTED[full]
