"""Logical axis name -> mesh axes: one small typed table per use, and its checks.

The model names every dimension logically (``embed``, ``heads``, ...); these tables
say where each name lives on the ``(data, fsdp, tensor)`` mesh. There is no catch-all:
a name without a rule is an error, so a new parameter cannot be silently replicated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.model import VOCAB_MULTIPLE, is_spec, padded_vocab_size, param_specs
from sharding.mesh import ALL_AXES, CONTEXT_AXIS, describe

MeshAxes = tuple[str, ...]

# Every logical name the model, the KV cache and the batches use.
LOGICAL_NAMES = ("batch", "seq", "embed", "vocab", "heads", "kv_heads", "cache_heads",
                 "head_dim", "mlp", "layers")


@dataclasses.dataclass(frozen=True)
class Rules:
    name: str
    table: Mapping[str, MeshAxes]

    def __post_init__(self):
        missing = [n for n in LOGICAL_NAMES if n not in self.table]
        extra = [n for n in self.table if n not in LOGICAL_NAMES]
        if missing or extra:
            raise ValueError(f"rules {self.name!r}: missing {missing}, unknown {extra}")
        for logical, mesh_axes in self.table.items():
            if not isinstance(mesh_axes, tuple) or not set(mesh_axes) <= set(ALL_AXES) \
                    or len(set(mesh_axes)) != len(mesh_axes):
                raise ValueError(f"rules {self.name!r}: {logical!r} -> {mesh_axes!r}; expected a "
                                 f"tuple of distinct mesh axes from {ALL_AXES}")

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return ()
        try:
            return self.table[logical]
        except KeyError:
            raise UserError(f"rules {self.name!r}: no rule for logical axis {logical!r}") from None

    def spec(self, axes: tuple, mesh: Mesh | None = None) -> P:
        """PartitionSpec for one array on ``mesh`` (a Mesh or an AbstractMesh; None keeps
        every mapped axis); mesh axes of size 1 are dropped. Raises if two dimensions of
        the array would land on the same mesh axis (checked before dropping, so a bad
        table fails on every mesh, not only on the big one)."""
        sizes = dict(mesh.shape) if mesh is not None else None
        used: dict[str, str] = {}
        parts = []
        for logical in axes:
            for a in self.mesh_axes(logical):
                if a in used:
                    raise UserError(
                        f"rules {self.name!r}: logical axes {used[a]!r} and {logical!r} of one "
                        f"array {tuple(axes)} both map to mesh axis {a!r}; change one rule")
                used[a] = logical
            mapped = tuple(a for a in self.mesh_axes(logical)
                           if sizes is None or sizes.get(a, 1) > 1)
            parts.append(None if not mapped else mapped[0] if len(mapped) == 1 else mapped)
        while parts and parts[-1] is None:
            parts.pop()
        return P(*parts)

    def sharding(self, mesh: Mesh, axes: tuple) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes, mesh))

    def for_model(self, cfg: LlamaConfig, mesh: Mesh) -> "Rules":
        """These rules for ``cfg`` on ``mesh``: KV heads that their mesh axes do not
        divide (MQA, or GQA with fewer KV heads than ``tensor``: the 8B's 8 on
        tensor=16) are replicated there: k/v weights and their LoRA adapters map
        ``kv_heads`` to no mesh axis, and each tensor shard computes every KV head for
        its query heads. The KV cache stays split (:func:`cache_heads`). Idempotent;
        every sharding of a model's arrays is computed through it."""
        n = axis_size(mesh, self.mesh_axes("kv_heads"))
        if n == 1 or cfg.num_key_value_heads % n == 0:
            return self
        return dataclasses.replace(self, table={**self.table, "kv_heads": ()})


# Training: weights fully sharded over `fsdp` (ZeRO-3 style, gathered per layer inside
# the scan), Megatron tensor parallelism over `tensor`, the batch over data x fsdp.
# Context parallelism: activations split along the sequence over `context`
# (meditron_jax/kernels/context.py), and the weights (with their Adam moments) sharded
# over it too, like fsdp: a context device computes gradients from its tokens only, so
# they are reduced over `context` whatever the weights' layout (absent axis: no effect).
TRAIN_RULES = Rules("train", {
    "batch": ("data", "fsdp"),
    "seq": (CONTEXT_AXIS,),
    "embed": ("fsdp", CONTEXT_AXIS),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "cache_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
})

# Inference: tensor parallelism over `tensor`, independent replicas over `data`; an
# `fsdp` axis, if given, shards the weights' embed dim (for models too big otherwise).
INFER_RULES = Rules("infer", {
    "batch": ("data",),
    "seq": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "cache_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
})

# Prefill of a long prompt with context parallelism: the inference table with the
# prompt's activations (and the KV cache's slots) split along the sequence over `context`.
# Decoding one token per row cannot split its sequence: it runs under INFER_RULES.
PREFILL_RULES = Rules("prefill", {**INFER_RULES.table, "seq": (CONTEXT_AXIS,)})

PRESETS = {"train": TRAIN_RULES, "infer": INFER_RULES}


def axis_size(mesh: Mesh, mesh_axes: MeshAxes) -> int:
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(a, 1) for a in mesh_axes)


def check_divisible(shape: tuple[int, ...], axes: tuple, rules: Rules, mesh: Mesh,
                    what: str) -> None:
    """Every sharded dimension must divide by its mesh axes' product."""
    for size, logical in zip(shape, axes):
        if logical is None:
            continue
        mesh_axes = rules.mesh_axes(logical)
        n = axis_size(mesh, mesh_axes)
        if n > 1 and size % n:
            # name the mesh's axes only (a mesh without `context` lacks that axis)
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape)
            raise UserError(
                f"{what}: {logical} size {size} is not divisible by mesh axes "
                f"{' x '.join(mesh_axes)} = {n}; pick a mesh whose {' x '.join(mesh_axes)} "
                f"divides {size}")


def cache_heads(cfg: LlamaConfig, mesh: Mesh, rules: Rules) -> int:
    """Heads of the KV cache for ``cfg`` on ``mesh`` (``KVCache.init(heads=)``): the
    least multiple of the model's KV heads that the ``cache_heads`` axes divide, so
    each device keeps only the heads its query heads read (one, when there are fewer
    KV heads than devices), instead of a replicated cache of every head: on tensor=16
    the 8B's decode plan (v5e, 8 rows x 8192 slots) needs 3.47 GiB per device, not 13.9.
    Query heads divide the axes (:func:`check_model_fits`), so they divide this too."""
    return math.lcm(cfg.num_key_value_heads, axis_size(mesh, rules.mesh_axes("cache_heads")))


def check_model_fits(cfg: LlamaConfig, mesh: Mesh, rules: Rules) -> None:
    """Divisibility of every parameter under ``rules.for_model`` (KV heads replicate
    where they do not divide); query heads and the padded vocabulary first, with
    errors in the model's terms."""
    rules = rules.for_model(cfg, mesh)
    heads, heads_axes = cfg.num_attention_heads, rules.mesh_axes("heads")
    n = axis_size(mesh, heads_axes)
    if n > 1 and heads % n:
        name = " x ".join(heads_axes)
        raise UserError(
            f"mesh {describe(mesh)}: the model's {heads} query heads are not divisible by "
            f"{name}={n}; use {name} in {[d for d in range(1, heads + 1) if heads % d == 0]}")
    vocab, vocab_axes = padded_vocab_size(cfg), rules.mesh_axes("vocab")
    n = axis_size(mesh, vocab_axes)
    if n > 1 and vocab % n:
        name = " x ".join(vocab_axes)
        raise UserError(
            f"mesh {describe(mesh)}: the vocabulary ({cfg.vocab_size} tokens, padded to "
            f"{vocab}, a multiple of {VOCAB_MULTIPLE}) is not divisible by {name}={n}; "
            f"use a power of two up to {VOCAB_MULTIPLE} for {name}")
    specs = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)[0]
    for path, spec in specs:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        check_divisible(spec.shape, spec.axes, rules, mesh, f"parameter {name}")
        rules.spec(spec.axes, mesh)  # collision check


def check_batch(batch_size: int, mesh: Mesh, rules: Rules) -> None:
    mesh_axes = rules.mesh_axes("batch")
    n = axis_size(mesh, mesh_axes)
    if batch_size % n:
        raise UserError(
            f"batch size {batch_size} is not divisible by the data axes "
            f"{' x '.join(mesh_axes)} = {n} of mesh {describe(mesh)}; use a batch that is a "
            f"multiple of {n}")


def check_sequence(seq: int, mesh: Mesh, rules: Rules) -> None:
    """A sequence of ``seq`` tokens splits over the mesh axis ``seq`` maps to: into
    2 x context equal chunks (each device holds two mirrored chunks,
    meditron_jax/kernels/context.py), or a one-line error."""
    from meditron_jax.kernels.context import check_length
    check_length(seq, axis_size(mesh, rules.mesh_axes("seq")))


def activation_constrainer(mesh: Mesh, rules: Rules):
    """The ``constrain`` hook the model calls at layer boundaries."""
    def constrain(x, axes):
        return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, axes))
    return constrain
