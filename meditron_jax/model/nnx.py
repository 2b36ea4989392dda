"""A Flax NNX view of the model, for users who compose NNX modules.

The library itself runs on the plain params dict (see the README's design notes); this
module wraps the same declarations as ``nnx.Param`` variables whose ``out_sharding``
metadata holds the logical axis names, so NNX tooling (``nnx.get_partition_spec``,
``nnx.split``/``merge``, ``nnx.jit``) works on it, and its ``__call__`` is the same
:func:`meditron_jax.model.forward`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from meditron_jax.model.config import LlamaConfig
from meditron_jax.model import forward, init_params, is_spec, param_specs


class _Group(nnx.Module):
    """A named group of weights (the decoder layers' stacked tensors)."""

    def __init__(self, weights: dict, specs: dict):
        for name, value in weights.items():
            setattr(self, name, nnx.Param(value, out_sharding=specs[name].axes,
                                          eager_sharding=False))


class Llama(nnx.Module):
    """``Llama(cfg, rngs=nnx.Rngs(0))`` or ``Llama.from_params(cfg, params)``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None = None,
                 params: dict | None = None, dtype=jnp.float32):
        if params is None:
            params = init_params(cfg, (rngs or nnx.Rngs(0)).params(), dtype)
        specs = param_specs(cfg)
        self.cfg = cfg
        for name, value in params.items():
            if name == "layers":
                self.layers = _Group(value, specs["layers"])
            else:
                setattr(self, name, nnx.Param(value, out_sharding=specs[name].axes,
                                              eager_sharding=False))

    @classmethod
    def from_params(cls, cfg: LlamaConfig, params: dict) -> "Llama":
        return cls(cfg, params=params)

    def params(self) -> dict:
        """The plain params dict the rest of the library runs on."""
        specs = param_specs(self.cfg)
        out = {}
        for name, spec in specs.items():
            if is_spec(spec):
                out[name] = getattr(self, name)[...]
            else:
                out[name] = {k: getattr(self.layers, k)[...] for k in spec}
        return out

    def __call__(self, tokens: jax.Array, **kwargs):
        return forward(self.params(), tokens, self.cfg, **kwargs)
