"""Score several continuations of one context with the context computed once.

A multiple-choice question is one few-shot context (hundreds of tokens) and k short
options. :class:`~infer.score.Scorer` runs ``context + option`` k times; here the
context runs once into a KV cache, the cache is repeated k times along the batch, and
only the options run on top of it: about k times fewer FLOPs for the same numbers
(they agree with :class:`Scorer` up to float reduction order).

Layout. Contexts are left-padded to a bucket ``Tc`` so each ends at slot ``Tc - 1``;
options are right-padded to a bucket ``W`` and fill slots ``Tc ..``. The first option
token is predicted by the context's last hidden state; the others by the option's own
earlier tokens, which attend to the shared context through the cache. RoPE positions
continue from each row's real context length, so a padded row computes what it
would alone.

Prefix reuse. Questions of a few-shot task share their first tokens (the header and
the worked examples). Given that ``prefix``, :meth:`GroupedScorer.score_groups` runs it
once into a KV cache (kept for the next call) and, per batch, broadcasts it to every
row: row ``r`` keeps the cache's first ``keep_r`` slots, the longest common token prefix
of its context and ``prefix`` (masked beyond it, so a question whose examples differ
part-way reuses what matches), and runs only the rest of its context, left-padded to a
bucket ``Ts``, on top. Keys at slot ``j`` depend only on tokens ``0..j`` (causal), so
the numbers are those of the full forward up to float reduction order. A batch whose
rest is no shorter (in buckets) than its whole context runs the plain way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer.runner import PAD_ID, bucket_length, cache_length, to_host
from infer.score import ScoreRequest, ScoreResult, Scorer
from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA
from meditron_jax.model.kvcache import CACHE_AXES, KVCache
from meditron_jax.model import check_token_ids, forward, logits_from_hidden, token_log_probs

# A shorter shared prefix is not worth its own pass (one bucket of tokens).
MIN_PREFIX = 16


@dataclasses.dataclass(frozen=True)
class ScoreGroup:
    id: Any
    context_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def shared_context_scores(params, ctx, pad, conts, cont_len, *, cfg, dtype, constrain=None,
                          kernels=XLA, cache_heads: int | None = None):
    """ctx [B, Tc] left-padded, conts [B, k, W] right-padded, cont_len [B, k] ->
    (sum log p of each continuation [B, k], every token the argmax [B, k])."""
    b, tc = ctx.shape
    w = conts.shape[2]
    slots = jnp.arange(tc, dtype=jnp.int32)[None, :]
    cache = _constrain_cache(KVCache.init(cfg, b, tc + w - 1, dtype, cache_heads), constrain)
    run = functools.partial(forward, params, cfg=cfg, dtype=dtype, constrain=constrain,
                            kernels=kernels, return_hidden=True)
    hidden, cache = run(ctx, positions=jnp.maximum(slots - pad[:, None], 0),
                        segment_ids=(slots >= pad[:, None]).astype(jnp.int32), cache=cache,
                        prefill=True)
    return _option_scores(run, params, cache, hidden[:, -1:], tc - pad, conts, cont_len,
                          cfg=cfg, constrain=constrain)


def prefix_kv(params, prefix, length, *, cfg, dtype, constrain=None, kernels=XLA,
              cache_heads: int | None = None):
    """prefix [D, Tp] (the same ids in every row, right-padded after ``length`` tokens) ->
    its keys and values [L, D, K, Tp, H]."""
    d, tp = prefix.shape
    slots = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (d, tp))
    cache = _constrain_cache(KVCache.init(cfg, d, tp, dtype, cache_heads), constrain)
    _, cache = forward(params, prefix, cfg, positions=slots,
                       segment_ids=(slots < length).astype(jnp.int32), cache=cache,
                       prefill=True, dtype=dtype, constrain=constrain, kernels=kernels,
                       return_hidden=True)
    return cache.k, cache.v


def shared_prefix_scores(params, prefix_k, prefix_v, keep, rest, pad, conts, cont_len, *,
                         cfg, dtype, constrain=None, kernels=XLA,
                         cache_heads: int | None = None):
    """Like :func:`shared_context_scores`, each context given as the first ``keep`` [B]
    tokens of a prefix already run (``prefix_k/v`` [L, D, K, Tp, H], D dividing B) and
    the rest, ``rest`` [B, Ts] left-padded by ``pad`` [B]."""
    b, ts = rest.shape
    _, d, _, tp, _ = prefix_k.shape
    w = conts.shape[2]
    cache = KVCache.init(cfg, b, tp + ts + w - 1, dtype, cache_heads)
    # Row r takes prefix row r // (B/D): on a mesh each data shard reads its own copy.
    fill = lambda c, p: c.at[:, :, :, :tp].set(jnp.repeat(p, b // d, axis=1).astype(c.dtype))
    slots = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
    cache = _constrain_cache(dataclasses.replace(
        cache, k=fill(cache.k, prefix_k), v=fill(cache.v, prefix_v),
        segment_ids=(slots < keep[:, None]).astype(jnp.int32),
        index=jnp.full_like(cache.index, tp)), constrain)
    run = functools.partial(forward, params, cfg=cfg, dtype=dtype, constrain=constrain,
                            kernels=kernels, return_hidden=True)
    cols = jnp.arange(ts, dtype=jnp.int32)[None, :]
    hidden, cache = run(rest, positions=jnp.maximum(keep[:, None] + cols - pad[:, None], 0),
                        segment_ids=(cols >= pad[:, None]).astype(jnp.int32), cache=cache)
    return _option_scores(run, params, cache, hidden[:, -1:], keep + ts - pad, conts, cont_len,
                          cfg=cfg, constrain=constrain)


def _constrain_cache(cache: KVCache, constrain) -> KVCache:
    if constrain is None:
        return cache
    return dataclasses.replace(cache, k=constrain(cache.k, CACHE_AXES),
                               v=constrain(cache.v, CACHE_AXES))


def _option_scores(run, params, cache: KVCache, last, ctx_len, conts, cont_len, *, cfg,
                   constrain):
    """The options [B, k, W] after contexts in ``cache`` (``ctx_len`` [B] real tokens,
    ``last`` [B, 1, D] the last one's hidden state) -> (log p [B, k], greedy [B, k])."""
    b, k, w = conts.shape
    first = logits_from_hidden(params, last, cfg, constrain)                    # [B, 1, V]
    logits = jnp.repeat(first, k, axis=0)                                       # [Bk, 1, V]
    flat = conts.reshape(b * k, w)
    if w > 1:
        # Every option continues its question's cache (rows b*k .. b*k + k - 1).
        repeat = lambda a, axis: jnp.repeat(a, k, axis=axis)
        shared = _constrain_cache(dataclasses.replace(
            cache, k=repeat(cache.k, 1), v=repeat(cache.v, 1),
            segment_ids=repeat(cache.segment_ids, 0),
            index=cache.index if cache.index.ndim == 0 else repeat(cache.index, 0)), constrain)
        start = repeat(ctx_len, 0)[:, None]
        # Padding after an option's end keeps segment 1: causality already hides it
        # from the option's tokens, and no query row is left with nothing to attend.
        hidden, _ = run(flat[:, :w - 1], positions=start + jnp.arange(w - 1)[None, :],
                        segment_ids=jnp.ones((b * k, w - 1), jnp.int32), cache=shared)
        logits = jnp.concatenate([logits, logits_from_hidden(params, hidden, cfg, constrain)],
                                 axis=1)                                        # [Bk, W, V]
    scored = jnp.arange(w)[None, :] < cont_len.reshape(b * k)[:, None]
    logprob = jnp.sum(jnp.where(scored, token_log_probs(logits, flat), 0.0), axis=-1)
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == flat) | ~scored, axis=-1)
    return logprob.reshape(b, k), greedy.reshape(b, k)


class GroupedScorer(Scorer):
    """A :class:`Scorer` that also scores groups (:meth:`score_groups`); ``batch_size``
    counts contexts, each with up to k options."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prefix: tuple | None = None   # (ids, keys, values) of the last prefix run
        # Token slots run through the layers (padding and idle rows included; attention
        # over the cache is not counted) and real context + option tokens computed:
        # what prefix reuse saves shows here.
        self.computed = {"slots": 0, "tokens": 0, "prefix_batches": 0, "plain_batches": 0}

    def group_fn(self):
        return self.jitted("group", build=self._build_group_fn)

    def _build_group_fn(self):
        pl = self.placement
        fn = functools.partial(shared_context_scores, cfg=self.cfg, dtype=self.dtype,
                               constrain=pl.constrain, kernels=self.kernels,
                               cache_heads=pl.cache_heads)
        if pl.mesh is None:
            return jax.jit(fn)
        rows = pl.sharding(("batch", None))
        return jax.jit(fn, in_shardings=(pl.params(), pl.sharding(("batch", "seq")),
                                         pl.sharding(("batch",)), pl.sharding(("batch", None, None)),
                                         rows), out_shardings=(rows, rows))

    def _build_prefix_fns(self):
        pl = self.placement
        facts = dict(cfg=self.cfg, dtype=self.dtype, constrain=pl.constrain,
                     kernels=self.kernels, cache_heads=pl.cache_heads)
        run_prefix = functools.partial(prefix_kv, **facts)
        score = functools.partial(shared_prefix_scores, **facts)
        if pl.mesh is None:
            return jax.jit(run_prefix), jax.jit(score)
        cache, row = pl.sharding(CACHE_AXES), pl.sharding(("batch",))
        seq, rows = pl.sharding(("batch", "seq")), pl.sharding(("batch", None))
        return (jax.jit(run_prefix, in_shardings=(pl.params(), seq, pl.sharding(())),
                        out_shardings=(cache, cache)),
                jax.jit(score, in_shardings=(pl.params(), cache, cache, row, seq, row,
                                             pl.sharding(("batch", None, None)), rows),
                        out_shardings=(rows, rows)))

    def prefix_rows(self) -> int:
        """Rows the prefix runs in: one per data shard, so each holds its own copy."""
        pl = self.placement
        if pl.mesh is None:
            return 1
        return int(np.prod([pl.mesh.shape[a] for a in pl.rules.mesh_axes("batch")]))

    def score_groups(self, groups: Sequence[ScoreGroup], *, truncate: bool = False,
                     prefix: Sequence[int] | None = None) -> list[list[ScoreResult]]:
        """Per group, one result per continuation (ids ``(group id, j)``), in input order.

        ``prefix``: token ids many contexts start with (a few-shot block); run once and
        reused by every context sharing some of its first tokens. The results do not
        depend on it (up to float reduction order); it only saves compute."""
        checked = [self._check_group(g, truncate) for g in groups]
        prefix = self._usable_prefix(prefix)
        keeps = [0 if prefix is None else _shared_length(g.context_ids, prefix)
                 for g in checked]
        order = sorted(range(len(checked)),
                       key=lambda i: -(len(checked[i].context_ids) - keeps[i]))
        results: list = [None] * len(checked)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = self._score_group_batch([checked[i] for i in rows],
                                            [keeps[i] for i in rows], prefix)
            for i, result in zip(rows, batch):
                results[i] = result
        return results

    def _usable_prefix(self, prefix: Sequence[int] | None) -> tuple[int, ...] | None:
        """The prefix as a tuple, or None where it is too short to be worth a pass or
        too long for the model."""
        if prefix is None:
            return None
        prefix = tuple(int(t) for t in prefix)
        if not MIN_PREFIX <= len(prefix) < self.cfg.max_position_embeddings:
            return None
        check_token_ids(np.asarray(prefix), self.cfg)
        return prefix

    def _check_group(self, group: ScoreGroup, truncate: bool) -> ScoreGroup:
        """Scorer's checks on every option; a context too long for the longest option is
        cut (or refused) once, so all options see the same context."""
        ctx = tuple(int(t) for t in group.context_ids)
        conts = tuple(tuple(int(t) for t in c) for c in group.continuations)
        if not conts:
            raise UserError(f"group {group.id!r}: no continuations to score")
        ctx = self.check(ScoreRequest(group.id, ctx, max(conts, key=len)),
                         truncate=truncate).context_ids
        for j, cont in enumerate(conts):
            self.check(ScoreRequest((group.id, j), ctx, cont))
        return ScoreGroup(group.id, ctx, conts)

    def _score_group_batch(self, groups: list[ScoreGroup], keeps: list[int] | None = None,
                           prefix: tuple[int, ...] | None = None) -> list[list[ScoreResult]]:
        limit = self.cfg.max_position_embeddings
        k = max(len(g.continuations) for g in groups)
        longest_ctx = max(len(g.context_ids) for g in groups)
        # One-token options (letters) need no second pass at all: w = 1.
        w = bucket_length(max(len(c) for g in groups for c in g.continuations), minimum=1,
                          cap=limit - longest_ctx)
        tc = bucket_length(longest_ctx, cap=limit - w + 1)  # the cache holds tc + w - 1
        conts, lens = self._options(groups, k, w)
        put = self.placement.put
        options = (put(conts, ("batch", None, None)), put(lens, ("batch", None)))
        self.computed["tokens"] += sum(sum(map(len, g.continuations)) for g in groups)
        self.computed["slots"] += self.batch_size * k * (w - 1)
        if prefix is not None and any(keeps):
            tp = cache_length(len(prefix), cap=limit)
            rest = [len(g.context_ids) - keep for g, keep in zip(groups, keeps)]
            ts = bucket_length(max(rest), cap=limit)
            if ts < tc and tp + ts + w - 1 <= limit:
                prefix_k, prefix_v = self._prefix_kv(prefix, tp)
                tokens = np.full((self.batch_size, ts), PAD_ID, np.int32)
                pad = np.full((self.batch_size,), ts - 1, np.int32)   # idle rows: one pad token
                keep = np.zeros((self.batch_size,), np.int32)
                for r, (g, n) in enumerate(zip(groups, rest)):
                    tokens[r, ts - n:] = g.context_ids[keeps[r]:]
                    pad[r], keep[r] = ts - n, keeps[r]
                self.computed["tokens"] += sum(rest)
                self.computed["slots"] += self.batch_size * ts
                self.computed["prefix_batches"] += 1
                logprob, greedy = self._prefix_fns()[1](
                    self.params, prefix_k, prefix_v, put(keep, ("batch",)),
                    put(tokens, ("batch", "seq")), put(pad, ("batch",)), *options)
                return self._results(groups, logprob, greedy)
        ctx = np.full((self.batch_size, tc), PAD_ID, np.int32)
        pad = np.full((self.batch_size,), tc - 1, np.int32)   # idle rows: one pad token
        for r, g in enumerate(groups):
            ctx[r, tc - len(g.context_ids):] = g.context_ids
            pad[r] = tc - len(g.context_ids)
        self.computed["tokens"] += sum(len(g.context_ids) for g in groups)
        self.computed["slots"] += self.batch_size * tc
        self.computed["plain_batches"] += 1
        logprob, greedy = self.group_fn()(self.params, put(ctx, ("batch", "seq")),
                                          put(pad, ("batch",)), *options)
        return self._results(groups, logprob, greedy)

    def _options(self, groups: list[ScoreGroup], k: int, w: int):
        conts = np.full((self.batch_size, k, w), PAD_ID, np.int32)
        lens = np.zeros((self.batch_size, k), np.int32)
        for r, g in enumerate(groups):
            for j, c in enumerate(g.continuations):
                conts[r, j, :len(c)], lens[r, j] = c, len(c)
        return conts, lens

    def _prefix_fns(self):
        return self.jitted("prefix", build=self._build_prefix_fns)

    def _prefix_kv(self, prefix: tuple[int, ...], tp: int):
        """The prefix's keys and values, run once per prefix (the last one is kept)."""
        if self._prefix is None or self._prefix[0] != prefix:
            self._prefix = None   # free the old one first
            rows = self.prefix_rows()
            tokens = np.full((rows, tp), PAD_ID, np.int32)
            tokens[:, :len(prefix)] = prefix
            put = self.placement.put
            kv = self._prefix_fns()[0](self.params, put(tokens, ("batch", "seq")),
                                       put(np.int32(len(prefix)), ()))
            self._prefix = (prefix, *kv)
            self.computed["tokens"] += len(prefix)
            self.computed["slots"] += rows * tp
        return self._prefix[1:]

    @staticmethod
    def _results(groups: list[ScoreGroup], logprob, greedy) -> list[list[ScoreResult]]:
        logprob, greedy = to_host(logprob), to_host(greedy)
        return [[ScoreResult(id=(g.id, j), logprob=float(logprob[r, j]), num_tokens=len(c),
                             greedy=bool(greedy[r, j])) for j, c in enumerate(g.continuations)]
                for r, g in enumerate(groups)]


def _shared_length(context: tuple[int, ...], prefix: tuple[int, ...]) -> int:
    """Leading tokens ``context`` shares with ``prefix``, leaving at least its last token
    to run (its hidden state predicts the first option token)."""
    n = 0
    for a, b in zip(context[:len(context) - 1], prefix):
        if a != b:
            break
        n += 1
    return n
