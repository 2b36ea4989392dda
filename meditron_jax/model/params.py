"""Every parameter of the decoder, declared once.

:func:`param_specs` gives each weight its shape, logical axis names and initializer.
Initialization, abstract shapes, shardings (``sharding/``), checkpoint restore targets,
LoRA targets and the Hugging Face key map all derive from that one table.
"""
from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp

from meditron_jax.model.config import LlamaConfig

Params = dict
# The embedding and head hold the vocabulary rounded up to a multiple of this (Megatron's
# make-vocab-size-divisible-by), so every power-of-two tensor axis up to 128 divides it.
VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    init: str = "normal"    # "normal" (std = initializer_range) or "ones"


def padded_vocab_size(cfg: LlamaConfig) -> int:
    """Rows of the embedding (and columns of the head): ``cfg.vocab_size`` rounded up to
    a multiple of :data:`VOCAB_MULTIPLE`. The extra rows are zeros, their logits are
    masked (:func:`mask_padded_vocab`) and their gradients are exactly zero, so they
    never change a result; checkpoints on disk hold ``cfg.vocab_size`` rows."""
    return -(-cfg.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def param_specs(cfg: LlamaConfig) -> dict:
    """The one declaration of every parameter (a nested dict mirroring the params)."""
    d, f, v, n = (cfg.hidden_size, cfg.intermediate_size, padded_vocab_size(cfg),
                  cfg.num_hidden_layers)
    h, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    specs = {
        "embed": ParamSpec((v, d), ("vocab", "embed")),
        "layers": {
            "attn_norm": ParamSpec((n, d), ("layers", "embed"), "ones"),
            "q": ParamSpec((n, d, heads, h), ("layers", "embed", "heads", "head_dim")),
            "k": ParamSpec((n, d, kv, h), ("layers", "embed", "kv_heads", "head_dim")),
            "v": ParamSpec((n, d, kv, h), ("layers", "embed", "kv_heads", "head_dim")),
            "o": ParamSpec((n, heads, h, d), ("layers", "heads", "head_dim", "embed")),
            "mlp_norm": ParamSpec((n, d), ("layers", "embed"), "ones"),
            "gate": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
            "up": ParamSpec((n, d, f), ("layers", "embed", "mlp")),
            "down": ParamSpec((n, f, d), ("layers", "mlp", "embed")),
        },
        "final_norm": ParamSpec((d,), ("embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(cfg: LlamaConfig) -> dict:
    """The params tree with each leaf replaced by its tuple of logical axis names."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=is_spec)


def _path_key(key: jax.Array, path) -> jax.Array:
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return jax.random.fold_in(key, salt)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32,
                std: float = 0.02) -> Params:
    """Random parameters. Each weight's key derives from its path, so the values do
    not depend on how (or whether) the init is sharded. Padded vocabulary rows are zero."""
    def make(path, spec: ParamSpec):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        dim = spec.axes.index("vocab") if "vocab" in spec.axes else None
        shape = spec.shape if dim is None else (
            spec.shape[:dim] + (cfg.vocab_size,) + spec.shape[dim + 1:])
        w = std * jax.random.normal(_path_key(key, path), shape, jnp.float32)
        if shape != spec.shape:
            w = jnp.pad(w, [(0, s - n) for s, n in zip(spec.shape, shape)])
        return w.astype(dtype)
    return jax.tree_util.tree_map_with_path(make, param_specs(cfg), is_leaf=is_spec)


def abstract_params(cfg: LlamaConfig, dtype=jnp.float32) -> Params:
    """ShapeDtypeStructs of every parameter; allocates nothing."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
