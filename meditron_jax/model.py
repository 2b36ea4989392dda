"""The Llama decoder: parameters declared once, and one pure forward function.

Each weight is declared by :func:`param_specs` with its shape, logical axis names and
initializer. Initialization, abstract shapes, shardings (``sharding/``), checkpoint
restore targets and the HF key map all derive from that one table.

:func:`forward` serves training, prefill and decode; it differs only in whether a
:class:`KVCache` is passed.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from meditron_jax import cpu_gemm
from meditron_jax.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.kvcache import KVCache
from meditron_jax.layers import (OutIn, apply_rope, attention, attention_head_major,
                                 attention_mask, causal_attention, dense, rms_norm, rope_tables,
                                 swiglu)
from meditron_jax.lora import merge_layer

Params = dict
Constrain = Callable[[jax.Array, tuple], jax.Array]

# Query chunks of the cache-free causal attention (layers.causal_attention); with
# oneMKL's batched products 8 measured faster (forward+backward 112 -> 96 ms per layer).
CAUSAL_CHUNKS = 4
CAUSAL_CHUNKS_BLAS = 8
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj")
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


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    }
    if policy not in policies:
        raise UserError(f"unknown remat policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def _no_constraint(x, axes):
    return x


def check_token_ids(tokens, cfg: LlamaConfig) -> None:
    """Host-side check of concrete token ids (jnp.take would silently clamp them)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    import numpy as np
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise UserError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
                        "check the tokenizer matches the model")


def forward(params: Params, tokens: jax.Array, cfg: LlamaConfig, *,
            positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None,
            cache: KVCache | None = None,
            dtype=jnp.float32,
            remat: str = "none",
            attention_impl: str | None = None,
            constrain: Constrain | None = None,
            return_hidden: bool = False,
            lora: tuple[dict, float] | None = None,
            matmul_impl: str | None = None,
            scan_layers: bool | None = None):
    """Run the decoder.

    tokens [B, T] int. positions [B, T] (default: slot index, i.e. 0..T-1 after what the
    cache holds). segment_ids [B, T] (default all 1; 0 = padding; tokens attend only
    within their segment). With ``cache``, the new keys/values are written at slots
    ``cache.index ...`` and the updated cache is returned.

    Returns ``(logits [B, T, V] float32, cache or None)`` with V = ``cfg.vocab_size``
    (the padded columns cut off, as transformers returns them); with ``return_hidden``
    the final normed hidden states [B, T, D] (compute dtype) instead of logits, for
    :func:`logits_from_hidden`.
    ``lora = (adapters, scale)`` merges LoRA adapters into each layer's weights
    (:mod:`meditron_jax.lora`). ``matmul_impl`` (None: automatic) picks XLA's dot or,
    on one CPU device, oneMKL for the float32 projections (:mod:`meditron_jax.cpu_gemm`).
    ``scan_layers`` (None: automatic) runs stacked layers as one ``lax.scan``, or
    without a cache as an unrolled loop (:func:`meditron_jax.cpu_gemm.scan_layers`:
    the default when oneMKL runs the matmuls).
    """
    constrain = constrain or _no_constraint
    mm = cpu_gemm.resolve(matmul_impl)
    b, t = tokens.shape
    limit = cache.max_len if cache is not None else t
    if limit > cfg.max_position_embeddings:
        raise UserError(f"sequence length {limit} exceeds max_position_embeddings "
                        f"({cfg.max_position_embeddings}); shorten the input")
    check_token_ids(tokens, cfg)
    start = cache.index if cache is not None else jnp.zeros((), jnp.int32)
    q_slots = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if positions is None:
        positions = q_slots
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)

    if cache is not None:
        kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, start))
    else:
        kv_segments = segment_ids
    mask = attention_mask(segment_ids, q_slots, kv_segments)
    cos, sin = rope_tables(positions, cfg)

    # Gather rows from a table sharded over vocab only (the fsdp-sharded embed dim is
    # all-gathered first): the lookup is then a masked local gather + reduction over
    # `tensor`, instead of a full rematerialization of the table on every device.
    table = constrain(params["embed"], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    x = constrain(x, ("batch", "seq", None))
    eps = cfg.rms_norm_eps
    n_heads, kv_heads, head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim)
    # A cache may hold each KV head several times (kvcache.py: a layout the mesh shards)
    cache_heads = cache.heads if cache is not None else kv_heads

    def block(carry, layer):
        x, k_cache, v_cache = carry
        lp, adapters, i = layer
        if adapters is not None:
            lp = merge_layer(lp, adapters, lora[1])
        w = jax.tree.map(lambda a: a.astype(dtype), lp)
        x = constrain(x, ("batch", "seq", None))
        # Matmuls on [M = B*T, D] rows: one contracting dim in each weight gradient,
        # which XLA:CPU computes in place; with (B, T) it first transposes the
        # activations (a slow copy per matmul per layer, bench/NOTES.md).
        h = rms_norm(x, w["attn_norm"], eps).reshape(b * t, -1)
        q = dense(h, w["q"], "MD,DNH->MNH", impl=mm).reshape(b, t, n_heads, head_dim)
        k = dense(h, w["k"], "MD,DKH->MKH", impl=mm).reshape(b, t, kv_heads, head_dim)
        v = dense(h, w["v"], "MD,DKH->MKH", impl=mm).reshape(b, t, kv_heads, head_dim)
        # Named so the "save_qkv_proj" remat policy keeps them instead of recomputing.
        q, k, v = (checkpoint_name(a, "qkv_proj") for a in (q, k, v))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache_heads != kv_heads:
            k, v = (jnp.repeat(a, cache_heads // kv_heads, axis=2) for a in (k, v))
        if k_cache is not None and i is None:  # this layer's own [B*K,S,H] buffers
            def head_major(a):
                return a.swapaxes(1, 2).reshape(b * cache_heads, t, head_dim).astype(
                    k_cache.dtype)
            k_cache = jax.lax.dynamic_update_slice(k_cache, head_major(k), (0, start, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, head_major(v), (0, start, 0))
            attn = attention_head_major(q, k_cache.astype(dtype), v_cache.astype(dtype), mask,
                                        mm)
        else:
            if k_cache is not None:
                k_cache = jax.lax.dynamic_update_slice(
                    k_cache, k[None].astype(k_cache.dtype), (i, 0, start, 0, 0))
                v_cache = jax.lax.dynamic_update_slice(
                    v_cache, v[None].astype(v_cache.dtype), (i, 0, start, 0, 0))
                k = jax.lax.dynamic_index_in_dim(k_cache, i, 0, keepdims=False).astype(dtype)
                v = jax.lax.dynamic_index_in_dim(v_cache, i, 0, keepdims=False).astype(dtype)
            attn = (attention(q, k, v, mask, attention_impl) if k_cache is not None
                    else causal_attention(q, k, v, mask, attention_impl,
                                          CAUSAL_CHUNKS_BLAS if mm == "blas" else CAUSAL_CHUNKS,
                                          mm, segment_ids))
        # One contraction over E = N*H: with (N, H) as two contracting dims XLA:CPU
        # may transpose the o weight (not the small activation) at every decode step.
        o = w["o"] if isinstance(w["o"], OutIn) else w["o"].reshape(-1, w["o"].shape[-1])
        out = dense(attn.reshape(b * t, -1), o, "ME,ED->MD", impl=mm)
        x = x + out.reshape(x.shape)
        h = rms_norm(x, w["mlp_norm"], eps).reshape(b * t, -1)
        x = x + swiglu(h, w["gate"], w["up"], w["down"], mm).reshape(x.shape)
        return (x, k_cache, v_cache), None

    block = _remat(block, remat)
    init = (x, cache.k if cache is not None else None, cache.v if cache is not None else None)
    layers = params["layers"]
    if (cache is None and not isinstance(layers, (list, tuple))
            and not cpu_gemm.scan_layers(scan_layers, mm)):
        layers = split_layers(layers)
    if isinstance(layers, (list, tuple)):  # unstacked: see unstack_layers
        ks, vs = per_layer_cache(cache) if cache is not None else (None, None)
        new_k, new_v = [], []
        for i, lp in enumerate(layers):
            adapters = jax.tree.map(lambda a: a[i], lora[0]) if lora else None
            (x, k_i, v_i), _ = block((x, ks and ks[i], vs and vs[i]), (lp, adapters, None))
            new_k.append(k_i)
            new_v.append(v_i)
        k_cache, v_cache = (tuple(new_k), tuple(new_v)) if cache is not None else (None, None)
    else:
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        (x, k_cache, v_cache), _ = jax.lax.scan(
            block, init, (layers, lora[0] if lora else None, layer_ids))

    x = constrain(x, ("batch", "seq", None))
    x = rms_norm(x, params["final_norm"].astype(dtype), eps)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=k_cache, v=v_cache, segment_ids=kv_segments, index=start + t)
    if return_hidden:
        return x, new_cache
    logits = _head_logits(params, x, cfg, constrain, mm)
    if logits.shape[-1] != cfg.vocab_size:
        logits = logits[..., :cfg.vocab_size]
    return logits, new_cache


def split_layers(layers: dict) -> tuple[dict, ...]:
    """Stacked [L, ...] layer weights as L per-layer dicts, inside a traced program: one
    ``lax.split`` per weight, whose transpose is one concatenate, so the stacked
    gradient is assembled in a single copy (indexing each layer would transpose into
    L zero-padded full-size buffers)."""
    n = jax.tree.leaves(layers)[0].shape[0]
    parts = {name: jax.lax.split(w, (1,) * n, axis=0) for name, w in layers.items()}
    return tuple({name: parts[name][i][0] for name in layers} for i in range(n))


# Projection weights and how many leading dims each contracts (o contracts N and H).
_PROJECTIONS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def unstack_layers(params: Params, *, out_in: bool = False, consume: bool = False) -> Params:
    """The same weights with ``layers`` as a tuple of per-layer dicts, for CPU decoding.

    A scanned layer reads its weights through a dynamic slice of the stacked arrays;
    TPU and GPU fuse that slice into the matmul, but XLA:CPU copies it first, and in
    the memory-bound decode step the copy costs more than the matmul (bench/NOTES.md).
    :func:`forward` runs unstacked layers as an unrolled loop whose matmuls read each
    weight buffer in place; compile time then grows with depth, so keep the stacked
    layout for training and for accelerators.

    ``out_in=True`` also stores every projection and the head transposed
    (:class:`~meditron_jax.layers.OutIn`): the faster layout for decoding on XLA:CPU
    (:func:`decode_layout`). ``consume=True`` deletes each stacked array as soon as
    its per-layer copies exist, so the peak is the weights plus one stacked tensor
    (the caller must hold no other use of ``params``).
    """
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    per_layer: list[dict] = [{} for _ in range(n)]
    for name, stacked in layers.items():
        for i in range(n):
            w = stacked[i]
            per_layer[i][name] = OutIn.of(w, _PROJECTIONS[name]) if (
                out_in and name in _PROJECTIONS) else w
        if consume and isinstance(stacked, jax.Array):
            jax.block_until_ready([lp[name] for lp in per_layer])
            stacked.delete()
    out = {**params, "layers": tuple(per_layer)}
    if out_in and "lm_head" not in params:
        # tied: the [V, D] embedding already is the transposed head, read in place
        out["lm_head"] = OutIn(params["embed"], (params["embed"].shape[0],))
    elif out_in:
        out["lm_head"] = OutIn.of(params["lm_head"])
        if consume and isinstance(params["lm_head"], jax.Array):
            jax.block_until_ready(out["lm_head"])
            params["lm_head"].delete()
    return out


def decode_layout(params: Params, *, consume: bool = False) -> Params:
    """Weights laid out for decoding on XLA:CPU: per-layer buffers, projections and head
    transposed (:func:`unstack_layers` with ``out_in``). Measured on `small`
    (bench/NOTES.md): 2x faster decode steps at batch 8, 15% at batch 1. Without
    ``consume`` it is a second copy of the weights."""
    return unstack_layers(params, out_in=True, consume=consume)


def per_layer_cache(cache: KVCache) -> tuple[tuple, tuple]:
    """The cache as one head-major [B*K, S, H] buffer per layer (the unstacked layers'
    layout): a stacked [L, B, S, K, H] cache is split and transposed once (in prefill,
    where it is still empty), and the decode loop then carries the per-layer buffers,
    which each layer updates and reads in place. One batch dim (B*K, not B and K)
    because XLA:CPU reshapes a two-batch-dim dot's operands, and a reshape between the
    cache update and the attention made it compute the update twice, copying every
    buffer three times per step (bench/NOTES.md)."""
    if isinstance(cache.k, (list, tuple)):
        return tuple(cache.k), tuple(cache.v)

    def split(c):
        _, b, s, k, h = c.shape
        return tuple(c[i].swapaxes(1, 2).reshape(b * k, s, h) for i in range(c.shape[0]))
    return split(cache.k), split(cache.v)


def logits_from_hidden(params: Params, x: jax.Array, cfg: LlamaConfig,
                       constrain: Constrain | None = None,
                       matmul_impl: str | None = None) -> jax.Array:
    """Logits [B, T, padded vocab] float32 of hidden states [B, T, D], the padded
    columns -inf (:func:`mask_padded_vocab`): sampling, softmax and scores over them
    equal those over the true vocabulary, and the array keeps the head's sharding."""
    return mask_padded_vocab(_head_logits(params, x, cfg, constrain, matmul_impl),
                             cfg.vocab_size)


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Columns ``>= vocab_size`` of [..., V_padded] logits set to -inf: probability
    exactly 0, never sampled (argmax, top-k/top-p sort them last), and zero gradient
    through softmax/logsumexp (``where`` passes none to them). A no-op, decided in
    Python, when the vocabulary needed no padding."""
    if logits.shape[-1] == vocab_size:
        return logits
    column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(column < vocab_size, logits, -jnp.inf)


def _head_logits(params: Params, x: jax.Array, cfg: LlamaConfig,
                 constrain: Constrain | None = None,
                 matmul_impl: str | None = None) -> jax.Array:
    mm = cpu_gemm.resolve(matmul_impl)
    head = params.get("lm_head")  # the decode layout's OutIn head, also when tied
    if not isinstance(head, OutIn):
        if cfg.tie_word_embeddings:
            # oneMKL reads the [V, D] embedding as the transposed head, in place
            head = (OutIn(params["embed"], (params["embed"].shape[0],)) if mm == "blas"
                    else params["embed"].T)
        else:
            head = params["lm_head"]
    if isinstance(head, OutIn) or mm == "blas":
        b, t, d = x.shape
        logits = dense(x.reshape(b * t, d), head.astype(x.dtype), "MD,DV->MV",
                       preferred_element_type=jnp.float32, impl=mm).reshape(b, t, -1)
    else:
        logits = jnp.einsum("BTD,DV->BTV", x, head.astype(x.dtype),
                            preferred_element_type=jnp.float32)
    return (constrain or _no_constraint)(logits, ("batch", "seq", "vocab"))


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, float32: logits [B,T,V], targets [B,T] -> [B,T]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token loss over positions with weight > 0; returns (loss, token count)."""
    nll = -token_log_probs(logits, targets)
    if weights is None:
        weights = jnp.ones_like(nll)
    weights = weights.astype(jnp.float32)
    count = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(count, 1.0), count
