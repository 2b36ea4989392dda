"""The declarative map between HF ``LlamaForCausalLM`` tensor names and our params.

Each entry names the HF key template, our parameter path, and the per-tensor transform
in each direction (transposes and reshapes only: our q/k use HF's rotate-half RoPE, so
no head permutation is needed). Shapes are checked against :func:`param_specs`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from meditron_jax.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.model import param_specs


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str                 # HF name; "{i}" marks the layer index
    ours: tuple[str, ...]   # path in our params tree
    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    # The same transform, declared: for each HF dim, the (per-layer) dims of our array
    # it flattens, outermost first (q's HF [heads*head_dim, embed] is ((1, 2), (0,))).
    # Sliced and blockwise reads/writes map an index through it (meditron_jax.tensor_blocks).
    hf_dims: tuple[tuple[int, ...], ...] = ()

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _same(w, cfg):
    return w


def _t(w, cfg):
    return np.ascontiguousarray(w.T)


def _q_in(w, cfg):
    return np.ascontiguousarray(w.T).reshape(cfg.hidden_size, -1, cfg.head_dim)


def _q_out(w, cfg):
    return np.ascontiguousarray(w.reshape(cfg.hidden_size, -1).T)


def _o_in(w, cfg):
    return np.ascontiguousarray(w.T).reshape(-1, cfg.head_dim, cfg.hidden_size)


def _o_out(w, cfg):
    return np.ascontiguousarray(w.reshape(-1, cfg.hidden_size).T)


_RULES = (
    KeyRule("model.embed_tokens.weight", ("embed",), _same, _same, ((0,), (1,))),
    KeyRule("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), _same, _same, ((0,),)),
    KeyRule("model.layers.{i}.self_attn.q_proj.weight", ("layers", "q"), _q_in, _q_out, ((1, 2), (0,))),
    KeyRule("model.layers.{i}.self_attn.k_proj.weight", ("layers", "k"), _q_in, _q_out, ((1, 2), (0,))),
    KeyRule("model.layers.{i}.self_attn.v_proj.weight", ("layers", "v"), _q_in, _q_out, ((1, 2), (0,))),
    KeyRule("model.layers.{i}.self_attn.o_proj.weight", ("layers", "o"), _o_in, _o_out, ((2,), (0, 1))),
    KeyRule("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm"), _same, _same,
            ((0,),)),
    KeyRule("model.layers.{i}.mlp.gate_proj.weight", ("layers", "gate"), _t, _t, ((1,), (0,))),
    KeyRule("model.layers.{i}.mlp.up_proj.weight", ("layers", "up"), _t, _t, ((1,), (0,))),
    KeyRule("model.layers.{i}.mlp.down_proj.weight", ("layers", "down"), _t, _t, ((1,), (0,))),
    KeyRule("model.norm.weight", ("final_norm",), _same, _same, ((0,),)),
    KeyRule("lm_head.weight", ("lm_head",), _t, _t, ((1,), (0,))),
)

# HF buffers that are recomputed, never weights.
_IGNORABLE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|model\.rotary_emb\.inv_freq$")


def rules(cfg: LlamaConfig) -> tuple[KeyRule, ...]:
    if cfg.tie_word_embeddings:
        return tuple(r for r in _RULES if r.ours != ("lm_head",))
    return _RULES


def _spec_at(cfg: LlamaConfig, path: tuple[str, ...]):
    node = param_specs(cfg)
    for p in path:
        node = node[p]
    return node


def hf_shape(rule: KeyRule, cfg: LlamaConfig) -> tuple[int, ...]:
    """Expected shape of one HF tensor (one layer's slice for per-layer rules)."""
    shape = _spec_at(cfg, rule.ours).shape
    if rule.per_layer:
        shape = shape[1:]
    # From the declared layout: transforming a dummy array would copy a whole tensor
    # (0.5 GB for an 8B model's lm_head) just to learn its shape.
    return tuple(math.prod(shape[d] for d in group) for group in rule.hf_dims)


def expected_hf_keys(cfg: LlamaConfig) -> dict[str, tuple[KeyRule, int | None]]:
    """HF name -> (rule, layer index or None) for every tensor a checkpoint must hold."""
    out = {}
    for rule in rules(cfg):
        if rule.per_layer:
            for i in range(cfg.num_hidden_layers):
                out[rule.hf.format(i=i)] = (rule, i)
        else:
            out[rule.hf] = (rule, None)
    return out


def check_key_set(names, cfg: LlamaConfig, where: str) -> None:
    """Completeness check: name every missing and every unexpected tensor."""
    expected = expected_hf_keys(cfg)
    names = set(names)
    missing = sorted(set(expected) - names)
    unexpected = sorted(n for n in names - set(expected) if not _IGNORABLE.match(n))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_preview(unexpected)}")
        raise UserError(f"{where}: {'; '.join(parts)} (does config.json match the weights?)")


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_hf_tensor(name: str, shape, cfg: LlamaConfig, where: str) -> None:
    rule, _ = expected_hf_keys(cfg)[name]
    want = hf_shape(rule, cfg)
    if tuple(shape) != want:
        raise UserError(f"{where}: tensor {name} has shape {tuple(shape)}, expected {want} "
                        "from config.json")


def is_ignorable(name: str) -> bool:
    return bool(_IGNORABLE.match(name))


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig, dtype=None) -> dict:
    """In-memory conversion of a full HF state dict (tests and small models).

    The streaming path for real checkpoints lives in :mod:`meditron_jax.convert`.
    """
    check_key_set(tensors, cfg, "state dict")
    out: dict = {}
    for name, (rule, layer) in expected_hf_keys(cfg).items():
        w = np.asarray(tensors[name])
        check_hf_tensor(name, w.shape, cfg, "state dict")
        w = rule.to_ours(w, cfg)
        if dtype is not None:
            w = w.astype(dtype)
        node = out
        for p in rule.ours[:-1]:
            node = node.setdefault(p, {})
        if layer is None:
            node[rule.ours[-1]] = w
        else:
            node.setdefault(rule.ours[-1], [None] * cfg.num_hidden_layers)[layer] = w
    for name in [r.ours[-1] for r in rules(cfg) if r.per_layer]:
        out["layers"][name] = np.stack(out["layers"][name])
    return out


def hf_from_params(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """In-memory inverse of :func:`params_from_hf`."""
    out = {}
    for name, (rule, layer) in expected_hf_keys(cfg).items():
        node = params
        for p in rule.ours:
            node = node[p]
        w = np.asarray(node if layer is None else node[layer])
        out[name] = rule.to_hf(w, cfg)
    return out
