"""Shardings for params, optimizer state, batches and the KV cache; sharded init.

Everything is derived from the model's logical axes and a rule table, abstractly
(``jax.eval_shape``), so nothing full-size is ever materialized on one device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meditron_jax.model.config import LlamaConfig
from meditron_jax.model.kvcache import KVCache
from meditron_jax.model import init_params, logical_axes
from meditron_jax.errors import UserError
from sharding.rules import Rules, check_model_fits


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, mesh: Mesh, rules: Rules):
    """Map a tree of logical-axes tuples to a tree of NamedShardings."""
    return jax.tree.map(lambda axes: rules.sharding(mesh, axes), axes_tree, is_leaf=_is_axes)


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: Rules, quantize: str | None = None):
    """The params' shardings under ``rules.for_model(cfg, mesh)``, checked to fit.
    ``quantize`` (``"int8"``): of :func:`meditron_jax.model.quant.quantize_params`'s tree,
    each int8 value sharded like the weight it replaces and its scale by the weight's
    output axes (replicated over the contracted ones), under the same rules (k/v
    replicated where the mesh does not divide the KV heads)."""
    check_model_fits(cfg, mesh, rules)
    if quantize is None:
        axes = logical_axes(cfg)
    else:
        from meditron_jax.model import quant
        quant.check_scheme(quantize)
        axes = quant.logical_axes(cfg)
    return tree_shardings(axes, mesh, rules.for_model(cfg, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_initializer(cfg: LlamaConfig, mesh: Mesh, rules: Rules, dtype=jnp.float32,
                        std: float = 0.02):
    """``key -> params``, jitted with the params' shardings as ``out_shardings``: each
    device generates only its own shards, so no device ever holds the whole model.
    The shardings come from the logical axes alone (abstract first); the values do not
    depend on the mesh (each weight's key derives from its path)."""
    return jax.jit(lambda k: init_params(cfg, k, dtype, std),
                   out_shardings=param_shardings(cfg, mesh, rules))


def init_sharded(cfg: LlamaConfig, key: jax.Array, mesh: Mesh, rules: Rules,
                 dtype=jnp.float32, std: float = 0.02):
    """Random params created directly in their shardings."""
    return sharded_initializer(cfg, mesh, rules, dtype, std)(key)


def place(tree, shardings):
    """Put arrays into the given shardings. Host arrays are cut per device
    (``make_array_from_callback``): each device receives only its shard, and on a
    multi-process mesh each process fills only its own devices (every process must hold
    the same host values)."""
    def put(x, s):
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def derived_shardings(abstract_tree, params_abstract, params_shardings, mesh: Mesh):
    """Shardings for a tree that embeds copies of the params tree (optimizer state:
    Adam's mu and nu). A leaf whose key path ends with a parameter's path and has that
    parameter's shape gets the parameter's sharding; every other leaf (step counters,
    scalars) is replicated."""
    shapes = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    shardings = jax.tree.leaves(params_shardings)
    by_path = {_keys(path): (tuple(leaf.shape), sh) for (path, leaf), sh in zip(shapes, shardings)}

    def pick(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and tuple(getattr(leaf, "shape", ())) == hit[0]:
                return hit[1]
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def _keys(path) -> tuple:
    out = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                out.append(getattr(p, attr))
                break
    return tuple(str(k) for k in out)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """[batch, seq, ...] arrays: batch over the data axes."""
    return rules.sharding(mesh, ("batch",) + ("seq",) + (None,) * (ndim - 2))


def cache_shardings(mesh: Mesh, rules: Rules):
    """Shardings of a ``KVCache`` (its heads dim: :func:`sharding.rules.cache_heads`)."""
    return tree_shardings(KVCache.logical_axes(), mesh, rules)


def step_kernels(attention: str, mesh: Mesh, rules: Rules, *, interpret: bool = False,
                 **facts):
    """The kernels (:func:`meditron_jax.kernels.select`) of a step on ``mesh`` under
    ``rules``: splash's shard_map splits the batch like the activations and the heads over
    the one mesh axis ``heads`` maps to (size-1 axes dropped), and the sequence over the
    one ``seq`` maps to (context parallelism, :mod:`meditron_jax.kernels.context`).
    ``facts``: the step's ``dtype``, ``head_dim`` and ``packed``
    (:func:`meditron_jax.kernels.select`)."""
    from meditron_jax.kernels import select
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in rules.mesh_axes("batch") if sizes.get(a, 1) > 1)
    heads = [a for a in rules.mesh_axes("heads") if sizes.get(a, 1) > 1]
    if len(heads) > 1:
        raise UserError(f"rules {rules.name!r} split heads over {'+'.join(heads)}; the "
                        "attention kernels take one head axis")
    head_axis = heads[0] if heads else None
    # context parallelism: the one mesh axis the sequence is split over
    seq = [a for a in rules.mesh_axes("seq") if sizes.get(a, 1) > 1]
    if len(seq) > 1:
        raise UserError(f"rules {rules.name!r} split the sequence over {'+'.join(seq)}; "
                        "context parallelism takes one mesh axis")
    return select(attention, mesh=mesh, batch_axes=batch_axes, head_axis=head_axis,
                  interpret=interpret, context_axis=seq[0] if seq else None, **facts)
