"""The declarative map between HF ``LlamaForCausalLM`` tensor names and our params.

Each entry names the HF key template, our parameter path, and the per-tensor transform
in each direction (transposes and reshapes only: our q/k use HF's rotate-half RoPE, so
no head permutation is needed). Shapes are checked against :func:`param_specs`.

Two differences between the layouts are declared here too. The vocabulary: our
embedding and head pad it (``param_specs`` declares :func:`padded_vocab_size` along every
``vocab`` axis), HF tensors hold ``cfg.vocab_size`` rows; reads zero-fill the padding and
writes drop it, all derived from :func:`stored_layer_shape`. Tied heads: a tied model's
head is its embedding, yet some exporters also store ``lm_head.weight``; such a copy is
accepted when it equals the embedding (:func:`tied_copies`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from meditron_jax.model.config import LlamaConfig
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
    # Sliced and blockwise reads/writes map an index through it (meditron_jax.io.tensor_blocks).
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


def tied_copies(cfg: LlamaConfig) -> dict[str, str]:
    """HF tensors a checkpoint may hold as an exact copy of another (copy -> original):
    a tied model's ``lm_head.weight``, which transformers does not write but some
    exporters do. Readers check the copy equals the original, then ignore it."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}


def tied_copy_differs(where: str, copy: str, original: str) -> UserError:
    return UserError(f"{where}: tensor {copy} differs from {original}, but config.json ties "
                     "them (tie_word_embeddings: true); set tie_word_embeddings to false to "
                     f"use the stored {copy}, or delete it")


def _spec_at(cfg: LlamaConfig, path: tuple[str, ...]):
    node = param_specs(cfg)
    for p in path:
        node = node[p]
    return node


def _layer_spec(rule: KeyRule, cfg: LlamaConfig) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Declared (per-layer) shape and logical axes of the parameter a rule maps."""
    spec = _spec_at(cfg, rule.ours)
    return (spec.shape[1:], spec.axes[1:]) if rule.per_layer else (spec.shape, spec.axes)


def stored_layer_shape(rule: KeyRule, cfg: LlamaConfig) -> tuple[int, ...]:
    """Our (per-layer) shape of what the HF tensor holds: the declared shape with every
    ``vocab`` axis at ``cfg.vocab_size`` (ours pads it; rows past it are zeros)."""
    shape, axes = _layer_spec(rule, cfg)
    return tuple(cfg.vocab_size if axis == "vocab" else n for n, axis in zip(shape, axes))


def hf_shape(rule: KeyRule, cfg: LlamaConfig) -> tuple[int, ...]:
    """Expected shape of one HF tensor (one layer's slice for per-layer rules)."""
    shape = stored_layer_shape(rule, cfg)
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
    unexpected = sorted(n for n in names - set(expected) - set(tied_copies(cfg))
                        if not _IGNORABLE.match(n))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_preview(unexpected)}")
        hint = ("a tied head? then config.json needs tie_word_embeddings: true"
                if missing == ["lm_head.weight"] and not unexpected
                else "does config.json match the weights?")
        raise UserError(f"{where}: {'; '.join(parts)} ({hint})")


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_hf_tensor(name: str, shape, cfg: LlamaConfig, where: str) -> None:
    rule, _ = expected_hf_keys(cfg)[tied_copies(cfg).get(name, name)]
    want = hf_shape(rule, cfg)
    if tuple(shape) != want:
        raise UserError(f"{where}: tensor {name} has shape {tuple(shape)}, expected {want} "
                        "from config.json")


def is_ignorable(name: str) -> bool:
    return bool(_IGNORABLE.match(name))


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig, dtype=None) -> dict:
    """In-memory conversion of a full HF state dict (tests and small models), the
    vocabulary padded with zeros.

    The streaming path for real checkpoints lives in :mod:`meditron_jax.io.convert`.
    """
    check_key_set(tensors, cfg, "state dict")
    for copy, original in tied_copies(cfg).items():
        if copy in tensors and not np.array_equal(tensors[copy], tensors[original]):
            raise tied_copy_differs("state dict", copy, original)
    out: dict = {}
    for name, (rule, layer) in expected_hf_keys(cfg).items():
        w = np.asarray(tensors[name])
        check_hf_tensor(name, w.shape, cfg, "state dict")
        w = _pad_to(rule.to_ours(w, cfg), _layer_spec(rule, cfg)[0])
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
    """In-memory inverse of :func:`params_from_hf` (the padding cut off)."""
    out = {}
    for name, (rule, layer) in expected_hf_keys(cfg).items():
        node = params
        for p in rule.ours:
            node = node[p]
        w = np.asarray(node if layer is None else node[layer])
        out[name] = rule.to_hf(w[tuple(slice(n) for n in stored_layer_shape(rule, cfg))], cfg)
    return out


def _pad_to(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero rows/columns appended up to ``shape`` (the padded vocabulary)."""
    if w.shape == shape:
        return w
    return np.pad(w, [(0, n - m) for n, m in zip(shape, w.shape)])
