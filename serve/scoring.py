"""Prompt log-probabilities: what ``echo: true`` with ``logprobs`` returns, and what
lm-eval's ``local-completions`` model sums for log-likelihood tasks.

One forward pass over each left-padded prompt (the layout of :mod:`infer.score`:
a bucketed length ``T``, padding in segment 0, RoPE positions from each row's first
token), then the vocabulary projection in chunks of :data:`CHUNK` positions under
``lax.map``, so the [B, T, V] logits of a long prompt are never built at once. For
every position: log p(next prompt token) (:func:`meditron_jax.model.token_log_probs`)
and the :data:`TOP` most likely tokens with their log-probs, taken from the same
log-softmax, so a token that is the argmax has exactly its top-1 value (lm-eval's
greediness test compares them with ``!=``).
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from infer.runner import PAD_ID, BatchRunner, bucket_length, to_host
from meditron_jax.kernels import XLA
from meditron_jax.model import forward, logits_from_hidden, token_log_probs

TOP = 5      # alternatives computed per position (the most /v1/completions may ask for)
CHUNK = 128  # positions per vocabulary projection


@dataclasses.dataclass
class PromptLogprobs:
    token_logprobs: list[float]               # log p(ids[i] | ids[:i]) for i = 1 .. n-1
    top: list[list[tuple[int, float]]]        # TOP (id, log-prob) at each of those positions
    next_top: list[tuple[int, float]]         # TOP (id, log-prob) for the token after the prompt


def prompt_scores(params, tokens, pad, *, cfg, dtype, constrain=None, kernels=XLA):
    """tokens [B, T] left-padded -> (log p(tokens[:, t+1]) [B, T], top values [B, T, TOP],
    top ids [B, T, TOP]) at every position t (the last position's first output is junk)."""
    b, t = tokens.shape
    slots = jnp.arange(t, dtype=jnp.int32)[None, :]
    segment_ids = (slots >= pad[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots - pad[:, None], 0)
    hidden, _ = forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                        dtype=dtype, constrain=constrain, kernels=kernels, return_hidden=True)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    chunk = min(CHUNK, t)
    n = t // chunk

    def one(args):
        h, tgt = args
        logits = logits_from_hidden(params, h, cfg, constrain)
        picked = token_log_probs(logits, tgt)
        logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        values, ids = jax.lax.top_k(logp, TOP)
        # the argmax's own log-prob, bit for bit as token_log_probs computes it
        values = values.at[..., 0].set(token_log_probs(logits, ids[..., 0]))
        return picked, values, ids

    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
    picked, values, ids = jax.lax.map(one, (split(hidden), split(targets)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t, *x.shape[3:])
    return merge(picked), merge(values), merge(ids)


class PromptScorer(BatchRunner):
    """Log-probs of whole prompts, ``batch_size`` rows a call; one caller at a time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def _fn(self):
        def build():
            pl = self.placement
            fn = functools.partial(prompt_scores, cfg=self.cfg, dtype=self.dtype,
                                   constrain=pl.constrain, kernels=self.kernels)
            if pl.mesh is None:
                return jax.jit(fn)
            row = pl.sharding(("batch",))
            return jax.jit(fn, in_shardings=(pl.params(), pl.sharding(("batch", "seq")), row))
        return self.jitted("prompt_logprobs", build=build)

    def score(self, prompts: list[list[int]]) -> list[PromptLogprobs]:
        out = []
        with self._lock:
            for start in range(0, len(prompts), self.batch_size):
                out += self._batch(prompts[start:start + self.batch_size])
        return out

    def _batch(self, prompts: list[list[int]]) -> list[PromptLogprobs]:
        t = bucket_length(max(len(p) for p in prompts), cap=self.cfg.max_position_embeddings)
        if t % min(CHUNK, t):
            t = -(-t // CHUNK) * CHUNK
        tokens = np.full((self.batch_size, t), PAD_ID, np.int32)
        pad = np.full((self.batch_size,), t - 1, np.int32)
        for r, ids in enumerate(prompts):
            tokens[r, t - len(ids):] = ids
            pad[r] = t - len(ids)
        put = self.placement.put
        picked, values, ids = self._fn()(self.params, put(tokens, ("batch", "seq")),
                                         put(pad, ("batch",)))
        picked, values, ids = to_host(picked), to_host(values), to_host(ids)
        out = []
        for r, prompt in enumerate(prompts):
            rows = range(t - len(prompt), t - 1)  # positions predicting prompt[1:]
            out.append(PromptLogprobs(
                token_logprobs=[float(picked[r, i]) for i in rows],
                top=[[(int(ids[r, i, j]), float(values[r, i, j])) for j in range(TOP)]
                     for i in rows],
                next_top=[(int(ids[r, t - 1, j]), float(values[r, t - 1, j]))
                          for j in range(TOP)]))
        return out
