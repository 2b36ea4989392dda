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
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer.engine import PAD_ID, bucket_length, to_host
from infer.score import ScoreRequest, ScoreResult, Scorer
from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA
from meditron_jax.model.kvcache import CACHE_AXES, KVCache
from meditron_jax.model import forward, logits_from_hidden, token_log_probs


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
    _, k, w = conts.shape
    slots = jnp.arange(tc, dtype=jnp.int32)[None, :]
    cache = KVCache.init(cfg, b, tc + w - 1, dtype, cache_heads)
    if constrain is not None:
        cache = dataclasses.replace(cache, k=constrain(cache.k, CACHE_AXES),
                                    v=constrain(cache.v, CACHE_AXES))
    run = functools.partial(forward, params, cfg=cfg, dtype=dtype, constrain=constrain,
                            kernels=kernels, return_hidden=True)
    hidden, cache = run(ctx, positions=jnp.maximum(slots - pad[:, None], 0),
                        segment_ids=(slots >= pad[:, None]).astype(jnp.int32), cache=cache,
                        prefill=True)
    first = logits_from_hidden(params, hidden[:, -1:], cfg, constrain)          # [B, 1, V]
    logits = jnp.repeat(first, k, axis=0)                                       # [Bk, 1, V]
    flat = conts.reshape(b * k, w)
    if w > 1:
        # Every option continues its question's cache (rows b*k .. b*k + k - 1).
        repeat = lambda a, axis: jnp.repeat(a, k, axis=axis)
        shared = KVCache(k=repeat(cache.k, 1), v=repeat(cache.v, 1),
                         segment_ids=repeat(cache.segment_ids, 0), index=cache.index)
        if constrain is not None:
            shared = dataclasses.replace(shared, k=constrain(shared.k, CACHE_AXES),
                                         v=constrain(shared.v, CACHE_AXES))
        start = repeat(tc - pad, 0)[:, None]
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

    def score_groups(self, groups: Sequence[ScoreGroup], *,
                     truncate: bool = False) -> list[list[ScoreResult]]:
        """Per group, one result per continuation (ids ``(group id, j)``), in input order."""
        checked = [self._check_group(g, truncate) for g in groups]
        order = sorted(range(len(checked)), key=lambda i: -len(checked[i].context_ids))
        results: list = [None] * len(checked)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            for i, result in zip(rows, self._score_group_batch([checked[i] for i in rows])):
                results[i] = result
        return results

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

    def _score_group_batch(self, groups: list[ScoreGroup]) -> list[list[ScoreResult]]:
        limit = self.cfg.max_position_embeddings
        k = max(len(g.continuations) for g in groups)
        longest_ctx = max(len(g.context_ids) for g in groups)
        # One-token options (letters) need no second pass at all: w = 1.
        w = bucket_length(max(len(c) for g in groups for c in g.continuations), minimum=1,
                          cap=limit - longest_ctx)
        tc = bucket_length(longest_ctx, cap=limit - w + 1)  # the cache holds tc + w - 1
        ctx = np.full((self.batch_size, tc), PAD_ID, np.int32)
        pad = np.full((self.batch_size,), tc - 1, np.int32)   # idle rows: one pad token
        conts = np.full((self.batch_size, k, w), PAD_ID, np.int32)
        lens = np.zeros((self.batch_size, k), np.int32)
        for r, g in enumerate(groups):
            ctx[r, tc - len(g.context_ids):] = g.context_ids
            pad[r] = tc - len(g.context_ids)
            for j, c in enumerate(g.continuations):
                conts[r, j, :len(c)], lens[r, j] = c, len(c)
        put = self.placement.put
        logprob, greedy = self.group_fn()(self.params, put(ctx, ("batch", "seq")),
                                          put(pad, ("batch",)), put(conts, ("batch", None, None)),
                                          put(lens, ("batch", None)))
        logprob, greedy = to_host(logprob), to_host(greedy)
        return [[ScoreResult(id=(g.id, j), logprob=float(logprob[r, j]), num_tokens=len(c),
                             greedy=bool(greedy[r, j])) for j, c in enumerate(g.continuations)]
                for r, g in enumerate(groups)]
