"""The sharding of every Meditron3-8B parameter (and the KV cache) under each rule table,
computed abstractly and compared with the checked-in snapshot, so that a rule change
shows up in review as a diff of tests/snapshots/sharding_meditron3-8b.txt.

Regenerate after an intended change: ``python -m tests.test_sharding_snapshot --update``
"""
from __future__ import annotations

import os
import sys

import jax
from jax.sharding import AbstractMesh, AxisType

from meditron_jax.model.config import preset
from meditron_jax.model.kvcache import KVCache
from meditron_jax.model import abstract_params, logical_axes
from sharding import INFER_RULES, MESH_AXES, TRAIN_RULES, cache_heads, describe, parse_mesh_spec

SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots", "sharding_meditron3-8b.txt")
MODEL = "meditron3-8b"
# Reference meshes: a 128-chip training pod, a 32-chip serving slice, and tensor=16,
# which the 8 KV heads do not fill (no devices needed: AbstractMesh).
CASES = ((TRAIN_RULES, "data=2,fsdp=16,tensor=4"), (INFER_RULES, "data=2,fsdp=2,tensor=8"),
         (INFER_RULES, "data=2,tensor=16"))
CACHE_BATCH, CACHE_LEN = 64, 8192


def abstract_mesh(spec: str) -> AbstractMesh:
    sizes = parse_mesh_spec(spec, num_devices=1 << 20)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def render() -> str:
    cfg = preset(MODEL)
    lines = [f"# Sharding of every {MODEL} parameter and the KV cache under each rule table.",
             "# Regenerate: python -m tests.test_sharding_snapshot --update"]
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    for rules, spec in CASES:
        mesh = abstract_mesh(spec)
        rules = rules.for_model(cfg, mesh)
        lines += ["", f"[{rules.name}] mesh {describe(mesh)}"]
        entries = [(name, leaf.shape, axes) for (name, leaf), axes in zip(
            _named_leaves(abstract_params(cfg)),
            jax.tree.leaves(logical_axes(cfg), is_leaf=is_axes))]
        if rules.name == INFER_RULES.name:
            heads = cache_heads(cfg, mesh, rules)
            cache = jax.eval_shape(lambda: KVCache.init(cfg, CACHE_BATCH, CACHE_LEN, heads=heads))
            entries += [("cache/" + name, leaf.shape, axes) for (name, leaf), axes in zip(
                _named_leaves(cache), jax.tree.leaves(KVCache.logical_axes(), is_leaf=is_axes))]
        for name, shape, axes in entries:
            sharding = rules.sharding(mesh, axes)
            lines.append(f"{name:<18} {_dims(shape):<23} {'(' + ', '.join(map(str, axes)) + ')':<45}"
                         f" {str(tuple(sharding.spec)):<38} shard {_dims(sharding.shard_shape(shape))}")
    return "\n".join(lines) + "\n"


def _named_leaves(tree):
    return [("/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _dims(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def test_sharding_snapshot():
    with open(SNAPSHOT, encoding="utf-8") as f:
        expected = f.read()
    assert render() == expected, (
        "the sharding of the 8B parameters changed; if intended, regenerate with "
        "`python -m tests.test_sharding_snapshot --update` and commit the diff")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_sharding_snapshot --update")
    os.makedirs(os.path.dirname(SNAPSHOT), exist_ok=True)
    tmp = SNAPSHOT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render())
    os.replace(tmp, SNAPSHOT)
    print(f"wrote {SNAPSHOT}")
