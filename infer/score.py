"""Log-likelihood of continuations given contexts (few-shot multiple-choice scoring).

Each request is one sequence ``context + continuation``, left-padded to a bucketed
length ``T``, so every continuation ends at slot ``T - 1`` and the positions that
predict it are one static slice ``[T-1-C, T-1)`` (``C`` = bucketed longest
continuation). Only that slice goes through the vocabulary projection: the [B, T, V]
logits of a long few-shot context (4 GB at V = 128k, T = 1024, B = 8) are never built.
Requests are sorted by length into batches, so a sweep compiles once per (T, C)
bucket pair: a handful of times.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from infer.runner import PAD_ID, BatchRunner, bucket_length, to_host
from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA
from meditron_jax.io.loading import LoadedModel
from meditron_jax.model import check_token_ids, forward, logits_from_hidden, token_log_probs
from meditron_jax.tokenizer import Tokenizer

MIN_CONTINUATION_BUCKET = 4


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    id: Any
    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    id: Any
    logprob: float    # sum of log p(token | everything before it) over the continuation
    num_tokens: int   # continuation tokens scored
    greedy: bool      # every continuation token was the argmax


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """Token ids of a text context and continuation, split where the whole text's
    encoding starts to differ from the context's: BPE merges across the boundary
    (" A" after "Answer:") then count as the model would see them, as lm-eval does."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(continuation, add_bos=False)


def continuation_scores(params, tokens, pad, cont_len, *, cfg, width: int, dtype,
                        constrain=None, kernels=XLA):
    """tokens [B, T] left-padded; the last ``cont_len`` [B] tokens of each row are the
    continuation (``width`` >= every cont_len). Returns (sum logprob [B], all greedy [B])."""
    b, t = tokens.shape
    slots = jnp.arange(t, dtype=jnp.int32)[None, :]
    segment_ids = (slots >= pad[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots - pad[:, None], 0)
    hidden, _ = forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                        dtype=dtype, constrain=constrain, kernels=kernels,
                        return_hidden=True)
    logits = logits_from_hidden(params, hidden[:, t - 1 - width:t - 1], cfg, constrain)
    targets = tokens[:, t - width:]
    scored = jnp.arange(width)[None, :] >= (width - cont_len)[:, None]
    logprob = jnp.sum(jnp.where(scored, token_log_probs(logits, targets), 0.0), axis=-1)
    hits = jnp.argmax(logits, axis=-1) == targets
    return logprob, jnp.all(hits | ~scored, axis=-1)


class Scorer(BatchRunner):
    """Score requests (see :meth:`score`)."""

    def __init__(self, model: LoadedModel, *, mesh: Mesh | None = None, batch_size: int = 8,
                 **kwargs):
        super().__init__(model, mesh, batch_size, **kwargs)

    def score_fn(self, width: int):
        """jit(continuation_scores) for one continuation bucket (compiles per T bucket)."""
        return self.jitted("score", width, build=lambda: self._build_score_fn(width))

    def _build_score_fn(self, width: int):
        pl = self.placement
        fn = functools.partial(continuation_scores, cfg=self.cfg, width=width, dtype=self.dtype,
                               constrain=pl.constrain, kernels=self.kernels)
        if pl.mesh is None:
            return jax.jit(fn)
        row = pl.sharding(("batch",))
        return jax.jit(fn, in_shardings=(pl.params(), pl.sharding(("batch", "seq")), row, row),
                       out_shardings=(row, row))

    def check(self, request: ScoreRequest, *, truncate: bool = False) -> ScoreRequest:
        """Validate one request; with ``truncate``, drop context from the left to fit."""
        label = f"request {request.id!r}"
        if not request.continuation_ids:
            raise UserError(f"{label}: empty continuation; give at least one token to score")
        if not request.context_ids:
            raise UserError(f"{label}: empty context; the first continuation token needs one "
                            "before it (use the bos token)")
        check_token_ids(np.asarray(request.context_ids + request.continuation_ids), self.cfg)
        limit = self.cfg.max_position_embeddings
        total = len(request.context_ids) + len(request.continuation_ids)
        if total > limit:
            if not truncate or len(request.continuation_ids) >= limit:
                raise UserError(f"{label}: {total} tokens exceed the model's max length {limit}; "
                                "shorten the context (or pass --truncate-context to drop its "
                                "oldest tokens)")
            keep = limit - len(request.continuation_ids)
            request = dataclasses.replace(request, context_ids=request.context_ids[-keep:])
        return request

    def score(self, requests: Sequence[ScoreRequest], *,
              truncate: bool = False) -> list[ScoreResult]:
        """Results in input order."""
        requests = [self.check(dataclasses.replace(
            r, context_ids=tuple(int(i) for i in r.context_ids),
            continuation_ids=tuple(int(i) for i in r.continuation_ids)), truncate=truncate)
            for r in requests]
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i].context_ids)
                                       + len(requests[i].continuation_ids)))
        results: list[ScoreResult | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            for i, result in zip(rows, self._score_batch([requests[i] for i in rows])):
                results[i] = result
        return results

    def _score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        limit = self.cfg.max_position_embeddings
        seqs = [r.context_ids + r.continuation_ids for r in requests]
        t = bucket_length(max(len(s) for s in seqs), cap=limit)
        width = bucket_length(max(len(r.continuation_ids) for r in requests),
                              minimum=MIN_CONTINUATION_BUCKET, cap=t - 1)
        tokens = np.full((self.batch_size, t), PAD_ID, np.int32)
        pad = np.full((self.batch_size,), t - 1, np.int32)   # idle rows: one pad token
        cont = np.zeros((self.batch_size,), np.int32)
        for r, (req, seq) in enumerate(zip(requests, seqs)):
            tokens[r, t - len(seq):] = seq
            pad[r], cont[r] = t - len(seq), len(req.continuation_ids)
        put = self.placement.put
        logprob, greedy = self.score_fn(width)(self.params, put(tokens, ("batch", "seq")),
                                               put(pad, ("batch",)), put(cont, ("batch",)))
        logprob, greedy = to_host(logprob), to_host(greedy)
        return [ScoreResult(id=req.id, logprob=float(logprob[r]),
                            num_tokens=len(req.continuation_ids), greedy=bool(greedy[r]))
                for r, req in enumerate(requests)]
