"""The NNX view runs the same forward and carries the logical axes as metadata."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meditron_jax.model.config import preset
from meditron_jax.model import forward, init_params, logical_axes
from meditron_jax.model.nnx import Llama


def test_nnx_view_matches_plain_forward_and_names_axes():
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(1))
    model = Llama.from_params(cfg, params)
    tokens = jnp.arange(12, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]),
                                  np.asarray(forward(params, tokens, cfg)[0]))
    specs = nnx.get_partition_spec(nnx.state(model))
    assert tuple(specs["layers"]["q"]) == logical_axes(cfg)["layers"]["q"]
    assert tuple(specs["lm_head"]) == ("embed", "vocab")

    # split/merge round trip under nnx.jit keeps values
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    np.testing.assert_allclose(np.asarray(run(state, tokens)), np.asarray(model(tokens)[0]),
                               atol=1e-6)
    fresh = Llama(cfg, rngs=nnx.Rngs(0))
    assert jax.tree.structure(fresh.params()) == jax.tree.structure(params)
