"""Batched generation: one prefill per prompt-length bucket, then an on-device decode
loop over a donated KV cache.

Layout. Prompts are left-padded to a bucketed length ``P`` (a power of two), so every
row's last prompt token sits at slot ``P - 1`` and all rows write the same cache slot
at each step (one scalar ``cache.index``). Padding carries segment id 0, which the
attention mask never matches, and RoPE positions count from 0 at each row's first
real token (``position = slot - pad``), so a padded row computes exactly what it would
alone. The cache length ``S`` is a bucket of ``P + max_new_tokens``: prompts of many
lengths share one ``S``, hence one compiled decode loop.

Decode. :func:`decode` is a ``lax.while_loop`` of :func:`decode_step` with a per-row
finish flag; the number of steps is a traced argument, so the host can run the whole
generation in one call, or in chunks (to stream tokens, or to check stop strings,
which need the tokenizer) with the same executable. The state (cache included) is a
pytree value, donated at every call.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from infer.sampling import Sampling, sample
from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA
from meditron_jax.model.kvcache import CACHE_AXES, KVCache
from meditron_jax.model import abstract_params, check_token_ids, forward, logits_from_hidden
from infer.runner import PAD_ID, BatchRunner, Placement, bucket_length, cache_length, to_host
from sharding import INFER_RULES, Rules

MAX_STOP_IDS = 16       # stop ids live in a fixed-size array so their number never recompiles
STREAM_CHUNK = 1        # decode steps per host round trip when streaming tokens
STOP_STRING_CHUNK = 16  # ... when stop strings must be checked on the host
RUNNING, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}
RNG_IMPL = "threefry2x32"  # fixed, so a seed means the same tokens whatever jax's default


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array     # [B, S] int32: left-padded prompt, then generated tokens, by slot
    pad: jax.Array        # [B] int32 left padding (RoPE position = slot - pad)
    budget: jax.Array     # [B] int32 max new tokens (0 for filler rows)
    generated: jax.Array  # [B] int32 tokens generated so far (a stop token included)
    finish: jax.Array     # [B] int32 RUNNING / STOPPED / LENGTH
    rng: jax.Array        # [B, 2] uint32 raw threefry key per row
    stop_ids: jax.Array   # [MAX_STOP_IDS] int32, -1 = unused

    @staticmethod
    def logical_axes() -> "DecodeState":
        row = ("batch",)
        return DecodeState(cache=KVCache.logical_axes(), tokens=("batch", "seq"), pad=row,
                           budget=row, generated=row, finish=row, rng=("batch", None),
                           stop_ids=(None,))


# ---- the pure functions that get jitted ---------------------------------------------------
def _last_logits(params, hidden, cfg, constrain) -> jax.Array:
    return logits_from_hidden(params, hidden[:, -1:], cfg, constrain)[:, 0]


def prefill_logits(params, tokens, pad, *, cfg: LlamaConfig, max_len: int, dtype,
                   constrain=None, kernels=XLA,
                   cache_heads: int | None = None) -> tuple[jax.Array, KVCache]:
    """Run left-padded prompts [B, P] into a fresh cache of ``max_len`` slots (and
    ``cache_heads`` heads, :meth:`KVCache.init`); return the next-token logits [B, V]
    (float32, V padded: :func:`~meditron_jax.model.logits_from_hidden`) and the cache."""
    b, p = tokens.shape
    slots = jnp.arange(p, dtype=jnp.int32)[None, :]
    segment_ids = (slots >= pad[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots - pad[:, None], 0)
    cache = KVCache.init(cfg, b, max_len, dtype, cache_heads)
    if constrain is not None:
        cache = dataclasses.replace(cache, k=constrain(cache.k, CACHE_AXES),
                                    v=constrain(cache.v, CACHE_AXES))
    hidden, cache = forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                            cache=cache, prefill=True, dtype=dtype, constrain=constrain,
                            kernels=kernels, return_hidden=True)
    return _last_logits(params, hidden, cfg, constrain), cache


def step_logits(params, state: DecodeState, *, cfg: LlamaConfig, dtype, constrain=None,
                kernels=XLA) -> tuple[jax.Array, KVCache]:
    """Feed each row's token at slot ``cache.index``; return logits [B, V] and the cache."""
    slot = state.cache.index
    b = state.tokens.shape[0]
    token = jax.lax.dynamic_slice(state.tokens, (0, slot), (b, 1))
    positions = (slot - state.pad)[:, None]
    hidden, cache = forward(params, token, cfg, positions=positions,
                            segment_ids=jnp.ones((b, 1), jnp.int32), cache=state.cache,
                            dtype=dtype, constrain=constrain, kernels=kernels,
                            return_hidden=True)
    return _last_logits(params, hidden, cfg, constrain), cache


def _advance(state: DecodeState, logits: jax.Array, sampling: Sampling) -> DecodeState:
    """Sample each running row's next token, write it at slot ``cache.index``, and
    update the finish flags. Row keys are folded with the token's index, so a token
    does not depend on how the steps were chunked."""
    keys = jax.random.wrap_key_data(state.rng, impl=RNG_IMPL)
    step_keys = jax.vmap(jax.random.fold_in)(keys, state.generated)
    running = state.finish == RUNNING
    token = jnp.where(running, sample(logits, step_keys, sampling), PAD_ID)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None],
                                          (0, state.cache.index))
    generated = state.generated + running.astype(jnp.int32)
    stopped = running & jnp.any(token[:, None] == state.stop_ids[None, :], axis=-1)
    exhausted = running & ~stopped & (generated >= state.budget)
    finish = jnp.where(stopped, STOPPED, jnp.where(exhausted, LENGTH, state.finish))
    return dataclasses.replace(state, tokens=tokens, generated=generated, finish=finish)


def prefill(params, tokens, pad, budget, row_seeds, seed, stop_ids, *, cfg, max_len,
            sampling, dtype, constrain=None, kernels=XLA,
            cache_heads: int | None = None) -> DecodeState:
    """Prompts -> a decode state holding the cache and each row's first new token."""
    logits, cache = prefill_logits(params, tokens, pad, cfg=cfg, max_len=max_len, dtype=dtype,
                                   constrain=constrain, kernels=kernels,
                                   cache_heads=cache_heads)
    b, p = tokens.shape
    base = jax.random.key(seed, impl=RNG_IMPL)
    rng = jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(base, s)))(row_seeds)
    buffer = jax.lax.dynamic_update_slice(jnp.full((b, max_len), PAD_ID, jnp.int32),
                                          tokens.astype(jnp.int32), (0, 0))
    state = DecodeState(cache=cache, tokens=buffer, pad=pad, budget=budget,
                        generated=jnp.zeros((b,), jnp.int32),
                        finish=jnp.where(budget > 0, RUNNING, LENGTH).astype(jnp.int32),
                        rng=rng, stop_ids=stop_ids)
    return _advance(state, logits, sampling)


def decode_step(params, state: DecodeState, *, cfg, sampling, dtype, constrain=None,
                kernels=XLA) -> DecodeState:
    logits, cache = step_logits(params, state, cfg=cfg, dtype=dtype, constrain=constrain,
                                kernels=kernels)
    return _advance(dataclasses.replace(state, cache=cache), logits, sampling)


def decode(params, state: DecodeState, num_steps, **step_kwargs) -> DecodeState:
    """Up to ``num_steps`` decode steps, stopping early once every row has finished."""
    def cond(carry):
        state, i = carry
        return (i < num_steps) & jnp.any(state.finish == RUNNING)

    def body(carry):
        state, i = carry
        return decode_step(params, state, **step_kwargs), i + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
    return state


# ---- jitting ----------------------------------------------------------------------------------
def _jit(fn, placement: Placement, in_axes: tuple | None, out_axes, donate=()):
    if placement.mesh is None:
        return jax.jit(fn, donate_argnums=donate)
    return jax.jit(fn, in_shardings=in_axes, out_shardings=placement.tree(out_axes),
                   donate_argnums=donate)


def build_prefill(placement: Placement, *, max_len: int, sampling: Sampling, dtype,
                  kernels=XLA):
    """jit(prefill) for one cache length; it compiles once per prompt-length bucket."""
    fn = functools.partial(prefill, cfg=placement.cfg, max_len=max_len, sampling=sampling,
                           dtype=dtype, constrain=placement.constrain,
                           kernels=kernels, cache_heads=placement.cache_heads)
    row = ("batch",)
    in_axes = None if placement.mesh is None else (
        placement.params(), placement.sharding(("batch", "seq")), placement.sharding(row),
        placement.sharding(row), placement.sharding(row), placement.sharding(()),
        placement.sharding((None,)))
    return _jit(fn, placement, in_axes, DecodeState.logical_axes())


def build_decode(placement: Placement, *, sampling: Sampling, dtype, kernels=XLA):
    """jit(decode loop): the state (with its cache) is donated; one compile per cache shape."""
    fn = functools.partial(decode, cfg=placement.cfg, sampling=sampling, dtype=dtype,
                           constrain=placement.constrain, kernels=kernels)
    in_axes = None if placement.mesh is None else (
        placement.params(), placement.tree(DecodeState.logical_axes()), placement.sharding(()))
    return _jit(fn, placement, in_axes, DecodeState.logical_axes(), donate=(1,))


def abstract_decode_step(cfg: LlamaConfig, mesh: Mesh | None, rules: Rules = INFER_RULES, *,
                         batch: int, max_len: int, dtype=jnp.bfloat16,
                         sampling: Sampling = Sampling(), quantize: str | None = None):
    """The jitted decode loop and ShapeDtypeStruct arguments (with shardings) for it:
    ``fn.lower(*args).compile()`` plans memory for a mesh without allocating anything.
    ``quantize="int8"``: the weights are int8 (``meditron_jax.model.quant``), the KV cache
    and activations ``dtype``."""
    placement = Placement(cfg, mesh, rules, quantize)
    placement.check_fits(batch)
    fn = build_decode(placement, sampling=sampling, dtype=dtype)

    def state_shapes():
        b = batch
        row = jnp.zeros((b,), jnp.int32)
        return DecodeState(cache=KVCache.init(cfg, b, max_len, dtype, placement.cache_heads),
                           tokens=jnp.zeros((b, max_len), jnp.int32), pad=row, budget=row,
                           generated=row, finish=row, rng=jnp.zeros((b, 2), jnp.uint32),
                           stop_ids=jnp.zeros((MAX_STOP_IDS,), jnp.int32))

    def with_shardings(shapes, shardings):
        if shardings is None:
            return shapes
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)

    params = abstract_params(cfg, dtype)
    if quantize is not None:
        from meditron_jax.model.quant import quantize_params
        params = jax.eval_shape(lambda p: quantize_params(p, quantize), params)
    params = with_shardings(params, placement.params())
    state = with_shardings(jax.eval_shape(state_shapes),
                           placement.tree(DecodeState.logical_axes()))
    steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.sharding(()))
    return fn, (params, state, steps)


# ---- prompts ----------------------------------------------------------------------------------
def fit_prompt(ids: Sequence[int], max_new_tokens: int, cfg: LlamaConfig, *,
               truncate: bool = False, label: str = "prompt") -> list[int]:
    """Validate one prompt's ids; with ``truncate``, keep its last tokens so that the
    prompt plus ``max_new_tokens`` fits the model's max length."""
    ids = [int(i) for i in ids]
    if not ids:
        raise UserError(f"{label}: empty prompt; give at least one token")
    check_token_ids(np.asarray(ids), cfg)
    limit = cfg.max_position_embeddings
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"model's max length {limit}; lower it")
    if len(ids) + max_new_tokens > limit:
        if not truncate:
            raise UserError(
                f"{label}: {len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the "
                f"model's max length {limit}; shorten the prompt, lower --max-new-tokens, or "
                f"pass --truncate-prompt to keep its last {limit - max_new_tokens} tokens")
        ids = ids[len(ids) - (limit - max_new_tokens):]
    return ids


@dataclasses.dataclass
class Completion:
    ids: list[int]
    finish_reason: str          # "stop" (stop id or stop string) or "length"
    text: str | None = None     # decoded (stop string cut off) when there is a tokenizer
    # infer.batching, when asked: each token's log-prob and its top alternatives
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


TokenCallback = Callable[[int, list[int]], None]


class Generator(BatchRunner):
    """Generate for lists of token-id prompts (see :meth:`generate`). ``seconds``: wall
    time spent so far in ``"prefill"`` (a batch's prompts, until its first tokens are on
    the host) and ``"decode"`` (the rest of each batch), as the continuous engine counts
    them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds: collections.Counter[str] = collections.Counter(prefill=0.0, decode=0.0)

    def prefill_fn(self, max_len: int, sampling: Sampling):
        return self.jitted("prefill", max_len, sampling, build=lambda: build_prefill(
            self.placement, max_len=max_len, sampling=sampling, dtype=self.dtype,
            kernels=self.kernels))

    def decode_fn(self, sampling: Sampling):
        return self.jitted("decode", sampling, build=lambda: build_decode(
            self.placement, sampling=sampling, dtype=self.dtype,
            kernels=self.kernels))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 sampling: Sampling = Sampling(), seed: int = 0,
                 stop_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                 on_tokens: TokenCallback | None = None,
                 row_seeds: Sequence[int] | None = None,
                 truncate: bool = False) -> list[Completion]:
        """Completions in input order. ``stop_ids`` default to the checkpoint's eos ids;
        a stop id ends a row and is not part of its completion; a stop string ends it
        too (its ids keep the tokens that spelled it, its text is cut before it).
        ``on_tokens(i, new_ids)`` streams prompt ``i``'s tokens as they are made.
        ``row_seeds`` (default: the prompt's index) picks each prompt's random stream,
        so a prompt's sample does not depend on its batch."""
        prompts = [fit_prompt(p, max_new_tokens, self.cfg, truncate=truncate,
                              label=f"prompt {i}") for i, p in enumerate(prompts)]
        stop_ids = tuple(self.model.eos_ids if stop_ids is None else stop_ids)
        if len(stop_ids) > MAX_STOP_IDS:
            raise UserError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
        stop_strings = tuple(stop_strings)
        if any(not s for s in stop_strings):
            raise UserError("--stop: empty stop string")
        if stop_strings and self.model.tokenizer is None:
            raise UserError("--stop strings need a tokenizer; this model directory has none")
        seeds = list(range(len(prompts))) if row_seeds is None else [int(s) for s in row_seeds]
        if len(seeds) != len(prompts):
            raise UserError(f"{len(seeds)} row seeds for {len(prompts)} prompts")
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(prompts)))
            callback = None
            if on_tokens is not None:
                callback = lambda r, ids, start=start: on_tokens(start + r, ids)
            out += self._generate_batch([prompts[i] for i in rows], [seeds[i] for i in rows],
                                        max_new_tokens, sampling, seed, stop_ids,
                                        stop_strings, callback)
        return out

    # ---- one batch --------------------------------------------------------------------------
    def _generate_batch(self, prompts, seeds, max_new, sampling, seed, stop_ids, stop_strings,
                        on_tokens) -> list[Completion]:
        limit = self.cfg.max_position_embeddings
        b, n = self.batch_size, len(prompts)
        clock, phase = time.perf_counter(), "prefill"
        p = bucket_length(max(len(x) for x in prompts), cap=limit - max_new)
        s = cache_length(p + max_new, cap=limit)
        tokens = np.full((b, p), PAD_ID, np.int32)
        pad = np.full((b,), p - 1, np.int32)       # idle rows: one pad token, no budget
        budget = np.zeros((b,), np.int32)
        for r, ids in enumerate(prompts):
            tokens[r, p - len(ids):] = ids
            pad[r], budget[r] = p - len(ids), max_new
        row_seeds = np.zeros((b,), np.uint32)
        row_seeds[:n] = np.asarray(seeds, np.int64) % (1 << 32)
        stops = np.full((MAX_STOP_IDS,), -1, np.int32)
        stops[:len(stop_ids)] = stop_ids
        put = self.placement.put
        state = self.prefill_fn(s, sampling)(
            self.params, put(tokens, ("batch", "seq")), put(pad, ("batch",)),
            put(budget, ("batch",)), put(row_seeds, ("batch",)),
            put(np.asarray(seed % (1 << 32), np.uint32), ()), put(stops, (None,)))

        chunk = (STREAM_CHUNK if on_tokens else STOP_STRING_CHUNK if stop_strings
                 else max_new)
        decode = self.decode_fn(sampling)
        kept = [0] * n                        # tokens of each row final (or streamed) so far
        done: dict[int, Completion] = {}
        while True:
            generated, buffer = to_host(state.generated), to_host(state.tokens)
            finish = to_host(state.finish).copy()
            now = time.perf_counter()
            self.seconds[phase] += now - clock
            clock, phase = now, "decode"
            ended_by_string = False
            for r in range(n):
                if r in done:
                    continue
                ids = buffer[r, p:p + generated[r]].tolist()
                end, reason, text = len(ids), int(finish[r]), None
                if reason == STOPPED:
                    end -= 1                  # the stop id is not part of the completion
                if stop_strings:
                    hit = stop_string_end(self.model.tokenizer.decode, ids[:end], kept[r],
                                          stop_strings)
                    if hit is not None:
                        (end, text), reason = hit, STOPPED
                        ended_by_string |= finish[r] == RUNNING
                        finish[r] = STOPPED
                if on_tokens and end > kept[r]:
                    on_tokens(r, ids[kept[r]:end])
                kept[r] = end
                if reason != RUNNING:
                    done[r] = self._completion(ids[:end], reason, text)
            if len(done) == n:
                self.seconds["decode"] += time.perf_counter() - clock
                return [done[r] for r in range(n)]
            if ended_by_string:  # take those rows out of the device loop too
                state = dataclasses.replace(state, finish=put(finish, ("batch",)))
            state = decode(self.params, state, put(np.asarray(chunk, np.int32), ()))

    def _completion(self, ids: list[int], finish: int, text: str | None) -> Completion:
        if text is None and self.model.tokenizer is not None:
            text = self.model.tokenizer.decode(ids)
        return Completion(ids=ids, finish_reason=FINISH_REASONS[finish], text=text)


def stop_string_end(decode, ids: list[int], start: int, stop_strings) -> tuple | None:
    """(tokens up to the one completing a stop string, the text before it) or None;
    tokens before ``start`` were already checked. ``decode``: the tokenizer's."""
    if not any(s in decode(ids) for s in stop_strings):
        return None
    for k in range(start + 1, len(ids) + 1):
        text = decode(ids[:k])
        hits = [text.find(s) for s in stop_strings if s in text]
        if hits:
            return k, text[:min(hits)]
    return None
