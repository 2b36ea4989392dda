"""The Llama decoder: one pure forward for training, prefill and decoding, on every backend.

``forward`` reads as embed -> layers (attention, MLP) -> head, each under
``jax.named_scope`` so profiles name them. Backend kernels enter only through the
:class:`~meditron_jax.kernels.Kernels` value the caller passes (built once with its
step); the layer math lives in :mod:`meditron_jax.model.layers`. Weights have one layout
(:func:`meditron_jax.model.params.param_specs`): stacked ``[L, ...]`` layers run as one
``lax.scan``; the same arrays split per layer (:func:`unstack_layers`) run as an unrolled
loop. The KV cache has one layout (:class:`~meditron_jax.model.kvcache.KVCache`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA, Kernels
from meditron_jax.model.config import LlamaConfig
from meditron_jax.model.kvcache import KVCache, write_layer, write_slots
from meditron_jax.model.layers import (apply_rope, attention_mask, rms_norm, rope_tables,
                                       swiglu)
from meditron_jax.model.lora import merge_layer
from meditron_jax.model.params import Params
from meditron_jax.model.quant import is_quantized, materialize

Constrain = Callable[[jax.Array, tuple], jax.Array]
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj")


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
            prefill: bool = False,
            dtype=jnp.float32,
            remat: str = "none",
            kernels: Kernels = XLA,
            constrain: Constrain | None = None,
            lora: tuple[dict, float] | None = None,
            return_hidden: bool = False):
    """Run the decoder on tokens [B, T] (int).

    positions [B, T] (default: the slot index, 0..T-1 after what the cache holds);
    segment_ids [B, T] (default all 1; 0 = padding; tokens attend only within their
    segment, causally by slot). With ``cache`` the new keys/values are written at slots
    ``cache.index ...`` (one index for all rows, or one per row) and the updated cache
    returned; ``prefill=True`` promises the cache
    is empty, so attention runs within the new tokens through the kernels' causal path
    (splash on TPU) instead of over the whole cache. ``lora = (adapters, scale)`` merges
    LoRA adapters into each layer's weights (:mod:`meditron_jax.model.lora`).

    Returns ``(logits [B, T, V] float32, cache or None)`` with V = ``cfg.vocab_size``
    (padded columns cut off, as transformers returns them); with ``return_hidden`` the
    final normed hidden states [B, T, D] instead (:func:`logits_from_hidden`).
    """
    constrain = constrain or _no_constraint
    b, t = tokens.shape
    limit = cache.max_len if cache is not None else t
    if limit > cfg.max_position_embeddings:
        raise UserError(f"sequence length {limit} exceeds max_position_embeddings "
                        f"({cfg.max_position_embeddings}); shorten the input")
    check_token_ids(tokens, cfg)
    start = cache.index if cache is not None else jnp.zeros((), jnp.int32)
    # a shared index [] or one per row [B] (continuous batching: rows at their own slots)
    q_slots = jnp.broadcast_to(jnp.reshape(start, (-1, 1)) + jnp.arange(t, dtype=jnp.int32),
                               (b, t))
    positions = q_slots if positions is None else positions
    segment_ids = (jnp.ones((b, t), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32))
    # context parallelism: the tokens in the kernels' load-balanced order (kernels/context.py)
    kernels, order = kernels.for_sequence(t, cache=cache is not None, prefill=prefill)
    tokens, positions, segment_ids = (order.arrange(a) for a in (tokens, positions, segment_ids))
    ctx = _Context(cfg, dtype, kernels, constrain, segment_ids, rope_tables(positions, cfg))
    if cache is not None:
        kv_segments = write_slots(cache.segment_ids, segment_ids, start)
        ctx.start, ctx.cache_heads = start, cache.heads
        if not prefill:
            ctx.mask = attention_mask(segment_ids, q_slots, kv_segments)

    with jax.named_scope("embed"):
        # Rows gathered from a table sharded over vocab only (the fsdp-sharded embed dim is
        # all-gathered first): a masked local gather + a reduction over `tensor`.
        table = constrain(params["embed"], ("vocab", None))
        x = constrain(jnp.take(table, tokens, axis=0).astype(dtype), ("batch", "seq", None))

    with jax.named_scope("layers"):
        x, k_cache, v_cache = _layers(params["layers"], x, cache, lora, ctx, remat)

    with jax.named_scope("head"):
        x = rms_norm(constrain(order.restore(x), ("batch", "seq", None)),
                     params["final_norm"].astype(dtype),
                     cfg.rms_norm_eps)
        new_cache = None if cache is None else KVCache(k=k_cache, v=v_cache,
                                                       segment_ids=kv_segments, index=start + t)
        if return_hidden:
            return x, new_cache
        logits = _head_logits(params, x, cfg, constrain)
    return logits[..., :cfg.vocab_size], new_cache


class _Context:
    """What every layer reads (per forward call, not per layer)."""

    def __init__(self, cfg, dtype, kernels, constrain, segment_ids, rope):
        self.cfg, self.dtype, self.kernels, self.constrain = cfg, dtype, kernels, constrain
        self.segment_ids, (self.cos, self.sin) = segment_ids, rope
        self.start, self.cache_heads, self.mask = None, cfg.num_key_value_heads, None


def _layers(layers, x, cache: KVCache | None, lora, ctx: _Context, remat: str):
    """Every decoder layer: stacked weights as one ``lax.scan``, per-layer weights (a tuple,
    :func:`unstack_layers`) as an unrolled loop. The cache [L, ...] is carried and each
    layer writes its slice in place."""
    def step(carry, layer):
        x, k_cache, v_cache = carry
        w, adapters, i = layer
        if adapters is not None:
            w = merge_layer(w, adapters, lora[1])
        w = jax.tree.map(lambda a: materialize(a, ctx.dtype), w, is_leaf=is_quantized)
        x, k_cache, v_cache = _block(w, x, k_cache, v_cache, i, ctx)
        return (x, k_cache, v_cache), None

    step = _remat(step, remat)
    carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
    if isinstance(layers, (list, tuple)):
        for i, w in enumerate(layers):
            adapters = jax.tree.map(lambda a: a[i], lora[0]) if lora else None
            carry, _ = step(carry, (w, adapters, i))
        return carry
    ids = jnp.arange(jax.tree.leaves(layers)[0].shape[0], dtype=jnp.int32)
    carry, _ = jax.lax.scan(step, carry, (layers, lora[0] if lora else None, ids))
    return carry


def _block(w: dict, x, k_cache, v_cache, i, ctx: _Context):
    """One layer: x + attention(norm(x)), then + MLP(norm(.)). Projections run on [B*T, D]
    rows (one contracting dim per weight gradient)."""
    cfg, b, t = ctx.cfg, x.shape[0], x.shape[1]
    x = ctx.constrain(x, ("batch", "seq", None))
    with jax.named_scope("attention"):
        h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps).reshape(b * t, -1)
        q = jnp.einsum("MD,DNH->MNH", h, w["q"]).reshape(b, t, *w["q"].shape[1:])
        k = jnp.einsum("MD,DKH->MKH", h, w["k"]).reshape(b, t, *w["k"].shape[1:])
        v = jnp.einsum("MD,DKH->MKH", h, w["v"]).reshape(b, t, *w["v"].shape[1:])
        # named so the "save_qkv_proj" remat policy keeps them
        q, k, v = (checkpoint_name(a, "qkv_proj") for a in (q, k, v))
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if k_cache is None or ctx.mask is None:   # no cache, or prefill into an empty one
            attn = ctx.kernels.causal_attention(q, k, v, ctx.segment_ids)
        if k_cache is not None:
            k_cache, v_cache = (_store(c, a, i, ctx) for c, a in ((k_cache, k), (v_cache, v)))
            if ctx.mask is not None:
                k_i, v_i = (jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False).astype(ctx.dtype)
                            for c in (k_cache, v_cache))
                attn = ctx.kernels.cached_attention(q, k_i, v_i, ctx.mask)
        # one contraction over E = N*H
        o = w["o"].reshape(-1, w["o"].shape[-1])
        x = x + jnp.einsum("ME,ED->MD", attn.reshape(b * t, -1), o).reshape(x.shape)
    with jax.named_scope("mlp"):
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps).reshape(b * t, -1)
        x = x + swiglu(h, w["gate"], w["up"], w["down"]).reshape(x.shape)
    return x, k_cache, v_cache


def _store(cache: jax.Array, new: jax.Array, i, ctx: _Context) -> jax.Array:
    """Write one layer's new keys or values [B,T,K,H] into the cache [L,B,K',S,H] at slot
    ``ctx.start``, shared or per row (K' a multiple of K: each head repeated,
    :mod:`~meditron_jax.model.kvcache`)."""
    repeat = ctx.cache_heads // new.shape[2]
    if repeat > 1:
        new = jnp.repeat(new, repeat, axis=2)
    return write_layer(cache, new.swapaxes(1, 2).astype(cache.dtype), i, ctx.start)


def unstack_layers(params: Params, *, consume: bool = False) -> Params:
    """The same weights with ``layers`` as a tuple of per-layer dicts (the arrays split
    along L): :func:`forward` then runs an unrolled loop whose matmuls read each layer's
    weights in place, where a scan reads them through a dynamic slice that XLA:CPU copies
    every step (bench/NOTES.md). Compile time grows with depth; accelerators and training
    keep the stacked layers. ``consume=True`` deletes each stacked array once its slices
    exist (peak: the weights plus one stacked tensor; the caller holds no other use)."""
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    per_layer: list[dict] = [{} for _ in range(n)]
    for name, stacked in layers.items():
        for i in range(n):
            per_layer[i][name] = stacked[i]
        if consume:  # every array of it (an int8 QArray holds two)
            jax.block_until_ready([lp[name] for lp in per_layer])
            for a in jax.tree.leaves(stacked):
                if isinstance(a, jax.Array):
                    a.delete()
    return {**params, "layers": tuple(per_layer)}


def logits_from_hidden(params: Params, x: jax.Array, cfg: LlamaConfig,
                       constrain: Constrain | None = None) -> jax.Array:
    """Logits [B, T, padded vocab] float32 of hidden states [B, T, D], the padded
    columns -inf (:func:`mask_padded_vocab`): sampling, softmax and scores over them
    equal those over the true vocabulary, and the array keeps the head's sharding."""
    return mask_padded_vocab(_head_logits(params, x, cfg, constrain), cfg.vocab_size)


def _head_logits(params: Params, x: jax.Array, cfg: LlamaConfig,
                 constrain: Constrain | None = None) -> jax.Array:
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("BTD,DV->BTV", x, materialize(head, x.dtype),
                        preferred_element_type=jnp.float32)
    return (constrain or _no_constraint)(logits, ("batch", "seq", "vocab"))


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Columns ``>= vocab_size`` of [..., V_padded] logits set to -inf: probability
    exactly 0, never sampled (argmax, top-k/top-p sort them last), and zero gradient
    through softmax/logsumexp (``where`` passes none to them). A no-op, decided in
    Python, when the vocabulary needed no padding."""
    if logits.shape[-1] == vocab_size:
        return logits
    column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(column < vocab_size, logits, -jnp.inf)


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
