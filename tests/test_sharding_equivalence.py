"""On 8 CPU devices, for each mesh: forward logits, one train step's loss and updated
params equal the single-device results (float32), and every parameter's per-device
shard holds exactly total / (product of its mesh axes) elements."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from meditron_jax.model.config import preset
from meditron_jax.model import init_params, logical_axes
from sharding import TRAIN_RULES, make_mesh, mesh_shape, param_shardings, place
from tests.sharding_cases import assert_close, forward_and_step

# The tiny family model with 4 kv heads (8 query heads), so tensor=4 divides them.
CFG = preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4)
MESHES = ("fsdp=8", "data=2,fsdp=4", "fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2")


@pytest.fixture(scope="module")
def host_params():
    # std 0.25: large enough that a misrouted head or shard changes the logits visibly
    params = jax.jit(lambda key: init_params(CFG, key, std=0.25))(jax.random.key(3))
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def reference(host_params):
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    params = place(host_params, param_shardings(CFG, mesh, TRAIN_RULES))
    return forward_and_step(CFG, params, mesh, TRAIN_RULES)


def test_reference_step_moves_every_weight(reference, host_params):
    for path, before in jax.tree_util.tree_flatten_with_path(host_params)[0]:
        name = "param/" + "/".join(str(k.key) for k in path)
        assert np.max(np.abs(reference[name] - before)) > 1e-4, name


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_equals_single_device(spec, host_params, reference):
    mesh = make_mesh(spec)
    params = place(host_params, param_shardings(CFG, mesh, TRAIN_RULES))
    check_shard_sizes(params, mesh)
    assert_close(forward_and_step(CFG, params, mesh, TRAIN_RULES), reference)


def check_shard_sizes(params, mesh) -> None:
    """Shard size from the rule table, computed independently of the NamedShardings."""
    sizes = mesh_shape(mesh)
    axes = jax.tree.leaves(logical_axes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    split_somewhere = False
    for array, names in zip(jax.tree.leaves(params), axes):
        ways = math.prod(sizes[a] for n in names for a in TRAIN_RULES.table[n])
        split_somewhere |= ways > 1
        for shard in array.addressable_shards:
            assert shard.data.size == array.size // ways, (names, shard.data.shape)
    assert split_somewhere
