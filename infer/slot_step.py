"""The device side of continuous batching: the slots' state and the pure functions
that :class:`infer.batching.ContinuousEngine` jits (a prefill written into chosen
rows, a decode loop that returns when a row finishes).

Layout. Every slot (a row of the batch) holds one request at its own position: its
prompt at cache slots ``0 .. n-1`` (no padding, RoPE position = slot), its new tokens
after it, and its own cache index (``KVCache.index`` is [B] here). A decode step feeds
each row the token at its index and writes its key/value there, so rows that started at
different times decode side by side in one compiled step; rows not running (finished,
idle) keep their index and their results are ignored.

Sampling is per row (temperature, top-k, top-p are arrays, not compile-time settings);
it reproduces :func:`infer.sampling.sample` exactly, including the random keys
(``fold_in(key(seed), row seed)`` folded with the token's index), so a request gets the
tokens the static :class:`~infer.engine.Generator` gives it, greedy or seeded.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from infer.engine import LENGTH, MAX_STOP_IDS, RNG_IMPL, RUNNING, STOPPED
from meditron_jax.kernels import XLA
from meditron_jax.model import forward, logits_from_hidden
from meditron_jax.model.kvcache import CACHE_AXES, KVCache

MAX_TOP_LOGPROBS = 20   # the most alternatives a request may ask for (OpenAI's limit)
POOL_AXES = (None,) + tuple(a for a in CACHE_AXES if a != "batch")   # the prefix pool


# ---- device state -----------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """Per-slot settings and outputs ([B, ...] each; R rows in a prefill)."""
    tokens: jax.Array       # [B, S] int32: prompt, then new tokens, by slot
    prompt_len: jax.Array   # [B] int32: slot of the first new token
    budget: jax.Array       # [B] int32 max new tokens
    generated: jax.Array    # [B] int32 new tokens so far (a stop token included)
    finish: jax.Array       # [B] int32 RUNNING / STOPPED / LENGTH
    rng: jax.Array          # [B, 2] uint32 raw threefry key
    stop_ids: jax.Array     # [B, MAX_STOP_IDS] int32, -1 unused
    temperature: jax.Array  # [B] float32 (0 greedy)
    top_k: jax.Array        # [B] int32 (0 off)
    top_p: jax.Array        # [B] float32 (1 off)
    logprob: jax.Array      # [B, S] float32: log-prob of the token at each slot
    top_ids: jax.Array      # [B, S, MAX_TOP_LOGPROBS] int32
    top_logprob: jax.Array  # [B, S, MAX_TOP_LOGPROBS] float32

    @staticmethod
    def logical_axes() -> "Rows":
        row, seq = ("batch",), ("batch", "seq")
        return Rows(tokens=seq, prompt_len=row, budget=row, generated=row, finish=row,
                    rng=("batch", None), stop_ids=("batch", None), temperature=row,
                    top_k=row, top_p=row, logprob=seq, top_ids=("batch", "seq", None),
                    top_logprob=("batch", "seq", None))

    @staticmethod
    def empty(b: int, s: int) -> "Rows":
        i32 = functools.partial(np.zeros, dtype=np.int32)
        return Rows(tokens=i32((b, s)), prompt_len=i32((b,)), budget=i32((b,)),
                    generated=i32((b,)), finish=np.full((b,), LENGTH, np.int32),
                    rng=np.zeros((b, 2), np.uint32),
                    stop_ids=np.full((b, MAX_STOP_IDS), -1, np.int32),
                    temperature=np.zeros((b,), np.float32), top_k=i32((b,)),
                    top_p=np.ones((b,), np.float32), logprob=np.zeros((b, s), np.float32),
                    top_ids=i32((b, s, MAX_TOP_LOGPROBS)),
                    top_logprob=np.zeros((b, s, MAX_TOP_LOGPROBS), np.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    cache: KVCache   # index [B]: each row's next slot
    rows: Rows

    @staticmethod
    def logical_axes() -> "SlotState":
        return SlotState(cache=dataclasses.replace(KVCache.logical_axes(), index=("batch",)),
                         rows=Rows.logical_axes())


# ---- the pure functions that get jitted ---------------------------------------------------
def sample_rows(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """:func:`infer.sampling.sample` with per-row settings: the same tokens for the same
    keys (greedy rows: argmax). The sorting only runs when some row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        v = logits.shape[-1]
        t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
        scaled = logits.astype(jnp.float32) / t[:, None]
        ordered = jnp.sort(scaled, axis=-1, descending=True)
        kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
        k_on = ((top_k > 0) & (top_k < v))[:, None]     # as mask_top_k
        scaled = jnp.where(k_on & (scaled < kth), -jnp.inf, scaled)
        ordered = jnp.where(k_on & (ordered < kth), -jnp.inf, ordered)   # still sorted
        probs = jax.nn.softmax(ordered, axis=-1)          # as mask_top_p, p per row
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p[:, None], axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        scaled = jnp.where((top_p < 1.0)[:, None] & (scaled < cutoff), -jnp.inf, scaled)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


def _advance(rows: Rows, logits: jax.Array, slot: jax.Array, with_logprobs: bool) -> Rows:
    """Sample each running row's next token into ``slot`` [B]; update the finish flags.
    A row's key is folded with the token's index (chunking never changes a token)."""
    b, s = rows.tokens.shape
    keys = jax.random.wrap_key_data(rows.rng, impl=RNG_IMPL)
    step_keys = jax.vmap(jax.random.fold_in)(keys, rows.generated)
    running = rows.finish == RUNNING
    token = sample_rows(logits, step_keys, rows.temperature, rows.top_k, rows.top_p)
    at = jnp.where(running, slot, s)          # not running: written nowhere (dropped)
    ar = jnp.arange(b)
    out = dict(tokens=rows.tokens.at[ar, at].set(token, mode="drop"))
    if with_logprobs:
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
        out.update(logprob=rows.logprob.at[ar, at].set(
                       jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0], mode="drop"),
                   top_ids=rows.top_ids.at[ar, at].set(top_ids.astype(jnp.int32), mode="drop"),
                   top_logprob=rows.top_logprob.at[ar, at].set(top_lp, mode="drop"))
    generated = rows.generated + running.astype(jnp.int32)
    stopped = running & jnp.any(token[:, None] == rows.stop_ids, axis=-1)
    exhausted = running & ~stopped & (generated >= rows.budget)
    finish = jnp.where(stopped, STOPPED, jnp.where(exhausted, LENGTH, rows.finish))
    return dataclasses.replace(rows, generated=generated, finish=finish, **out)


def _last_logits(params, hidden, last, cfg, constrain):
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)   # [B, 1, D]
    return logits_from_hidden(params, h, cfg, constrain)[:, 0]


def prefill(params, state: SlotState, pool, new: Rows, suffix, suffix_len, start, entry,
            slots, save, seeds, *, cfg, dtype, chunk_len: int, with_prefix: bool,
            with_logprobs: bool, constrain=None, kernels=XLA) -> tuple[SlotState, object]:
    """Prefill R requests and write them into ``slots`` [R] of the running batch (a slot
    >= B: a filler row, dropped). ``new`` holds the R rows' settings (their ``tokens``:
    the whole prompt by slot); ``suffix`` [R, T] the tokens to run, from slot ``start``
    [R] (0, or the length of the prefix copied from pool entry ``entry`` [R]);
    ``suffix_len`` [R] how many of them are real. ``save`` [R]: the pool entry that keeps
    this prompt's first slots for later requests (>= entries: none). ``seeds`` [R+1]
    uint32: the engine's seed, then each row's (their keys as the Generator makes them)."""
    r, t = suffix.shape
    base = jax.random.key(seeds[0], impl=RNG_IMPL)
    rng = jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(base, s)))(seeds[1:])
    steps = jnp.arange(t, dtype=jnp.int32)
    segments = (steps[None, :] < suffix_len[:, None]).astype(jnp.int32)
    positions = start[:, None] + steps[None, :]
    heads = state.cache.heads
    shape = (cfg.num_hidden_layers, r, heads, chunk_len, cfg.head_dim)
    k, v = jnp.zeros(shape, state.cache.k.dtype), jnp.zeros(shape, state.cache.v.dtype)
    seg = jnp.zeros((r, chunk_len), jnp.int32)
    if with_prefix:   # the prefix's slots, then the suffix attends to them through the cache
        pk, pv = (jnp.moveaxis(p[jnp.minimum(entry, p.shape[0] - 1)], 0, 1) for p in pool)
        k, v = (jax.lax.dynamic_update_slice(c, p, (0, 0, 0, 0, 0)) for c, p in ((k, pk), (v, pv)))
        seg = (jnp.arange(chunk_len)[None, :] < start[:, None]).astype(jnp.int32)
        index = start
    else:
        index = jnp.zeros((), jnp.int32)
    if constrain is not None:
        k, v = constrain(k, CACHE_AXES), constrain(v, CACHE_AXES)
    sub = KVCache(k=k, v=v, segment_ids=seg, index=index)
    hidden, sub = forward(params, suffix, cfg, positions=positions, segment_ids=segments,
                          cache=sub, prefill=not with_prefix, dtype=dtype, constrain=constrain,
                          kernels=kernels, return_hidden=True)
    logits = _last_logits(params, hidden, suffix_len - 1, cfg, constrain)
    n = start + suffix_len
    new = dataclasses.replace(new, prompt_len=n, generated=jnp.zeros((r,), jnp.int32), rng=rng)
    new = _advance(new, logits, n, with_logprobs)

    cache = state.cache
    s = cache.max_len
    row_segments = (jnp.arange(s)[None, :] < n[:, None]).astype(jnp.int32)
    cache = KVCache(k=cache.k.at[:, slots, :, :chunk_len].set(sub.k, mode="drop"),
                    v=cache.v.at[:, slots, :, :chunk_len].set(sub.v, mode="drop"),
                    segment_ids=cache.segment_ids.at[slots].set(row_segments, mode="drop"),
                    index=cache.index.at[slots].set(n, mode="drop"))
    rows = jax.tree.map(lambda old, x: old.at[slots].set(x.astype(old.dtype), mode="drop"),
                        state.rows, new)
    if pool is not None:
        keep = min(chunk_len, pool[0].shape[3])
        pool = tuple(p.at[save, :, :, :keep].set(jnp.moveaxis(c[:, :, :, :keep], 1, 0),
                                                 mode="drop")
                     for p, c in zip(pool, (sub.k, sub.v)))
    return SlotState(cache=cache, rows=rows), pool


def decode_step(params, state: SlotState, *, cfg, dtype, with_logprobs: bool,
                constrain=None, kernels=XLA) -> SlotState:
    cache, rows = state.cache, state.rows
    b = rows.tokens.shape[0]
    index = cache.index
    token = jnp.take_along_axis(rows.tokens, index[:, None], axis=1)
    hidden, cache = forward(params, token, cfg, positions=index[:, None],
                            segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache, dtype=dtype,
                            constrain=constrain, kernels=kernels, return_hidden=True)
    logits = _last_logits(params, hidden, jnp.zeros((b,), jnp.int32), cfg, constrain)
    running = rows.finish == RUNNING
    index = jnp.where(running, index + 1, index)
    rows = _advance(rows, logits, index, with_logprobs)
    return SlotState(cache=dataclasses.replace(cache, index=index), rows=rows)


def decode(params, state: SlotState, num_steps, **step_kwargs) -> SlotState:
    """Up to ``num_steps`` steps; returns as soon as a row that was running finishes."""
    def running(s):
        return jnp.sum(s.rows.finish == RUNNING)

    at_start = running(state)

    def cond(carry):
        s, i = carry
        return (i < num_steps) & (running(s) == at_start) & (at_start > 0)

    def body(carry):
        s, i = carry
        return decode_step(params, s, **step_kwargs), i + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
    return state
