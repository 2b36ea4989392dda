"""Preference objectives on [B, 2, T] pair batches: DPO (sigmoid), IPO and ORPO.

Each pair's two rows (chosen, rejected) run through the decoder as one [2B, T] batch.
A sequence's log-probability is the sum of its answer tokens' log-probs (``weights``).
With ``log_ratio = logp(policy) - logp(reference)``:

- **dpo**: ``-log sigmoid(beta * (ratio_chosen - ratio_rejected))``, mean over pairs;
- **ipo**: ``(ratio_chosen / n_chosen - ratio_rejected / n_rejected - 1 / (2 beta))^2``
  with ``n`` the answer's token count (TRL's length-normalised IPO);
- **orpo** (no reference): the chosen rows' NLL per token over prompt and answer (as
  TRL computes it) minus ``orpo_lambda * mean log sigmoid(log_odds)``, where the odds
  use each answer's mean token log-prob ``a``: ``log_odds = (a_c - a_r) - (log(1 - e^a_c)
  - log(1 - e^a_r))``.

These are TRL's definitions (its ``DPOTrainer`` and ``ORPOTrainer``); tests/
test_preference_trl.py checks loss and gradient against them. The reference log-probs
come from the frozen initial weights in the same step, without gradient: under LoRA the
base with the adapters off (no copy at all), otherwise ``TrainState.frozen``, a copy of
the initial weights in the compute dtype (the forward casts every weight to it, so the
values are the ones the policy started from) that is never updated or checkpointed.

Rewards (TRL's logged ones): ``beta * log_ratio`` for DPO/IPO, ``orpo_lambda * a`` for
ORPO; the margin is chosen minus rejected, the accuracy the share of pairs whose chosen
reward is strictly higher (0 at the first DPO step, where policy = reference).

Gradient accumulation: each pair's loss is divided by the pair count of the whole batch
(ORPO's NLL by its chosen token count), both known from the batch before any micro-batch
runs, so the summed micro-batch gradients are exactly those of the full batch.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from meditron_jax.model import forward
from meditron_jax.model.config import LlamaConfig
from train.step import (StepOptions, TrainState, _chunk_logits, _Head, _merge_chunks,
                        _split_chunks, micro_batches)

REFERENCE_OBJECTIVES = ("dpo", "ipo")
# per-pair sums the step returns as batch means (their names in metrics.jsonl)
PAIR_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
                "logp_chosen", "logp_rejected")


def needs_reference(objective: str) -> bool:
    return objective in REFERENCE_OBJECTIVES


def token_logps(params, hidden, targets, cfg: LlamaConfig, chunk: int):
    """Per-position log p(target) [N, T] float32, chunk by chunk over the sequence (at
    most [N, chunk, V] logits alive; each chunk's logits are recomputed for its
    gradient rather than kept)."""
    t = hidden.shape[1]
    chunk = math.gcd(t, min(chunk, t))
    head = _Head(params["embed"].T if cfg.tie_word_embeddings else params["lm_head"],
                 cfg.vocab_size)
    w = head.w.astype(hidden.dtype)

    @jax.checkpoint
    def piece(xs):
        h, tgt = xs
        return -_chunk_logits(h, _Head(w, head.vocab), tgt)[2]
    return _merge_chunks(jax.lax.map(piece, _split_chunks(chunk, hidden, targets)))


def _log1mexp(x):
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (as TRL's)."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def batch_norms(batch: dict) -> dict:
    """What every micro-batch's loss is divided by: pairs (with an answer token in both
    rows) and the chosen rows' real target tokens (ORPO's NLL), of the whole batch."""
    n = jnp.sum(batch["weights"], axis=-1)                     # [B, 2]
    valid = jnp.all(n > 0, axis=-1)
    chosen_tokens = jnp.sum(batch["segment_ids"][:, 0] > 0)
    return {"pairs": jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32),
            "chosen_tokens": jnp.maximum(chosen_tokens, 1).astype(jnp.float32)}


def make_pair_loss(cfg: LlamaConfig, opts: StepOptions, constrain=None) -> Callable:
    """``pair_loss(trainable, frozen, batch, norms) -> (loss, sums)``: this (micro-)batch's
    share of the batch loss, and per-pair metric sums (:data:`PAIR_METRICS`)."""
    objective = opts.objective

    def logps(params, lora, batch):
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}  # [2B, T], pairs adjacent
        hidden, _ = forward(params, flat["inputs"], cfg, positions=flat["positions"],
                            segment_ids=flat["segment_ids"], dtype=opts.compute_dtype,
                            remat=opts.remat, kernels=opts.kernels, constrain=constrain,
                            return_hidden=True, lora=lora)
        lp = token_logps(params, hidden, flat["targets"], cfg, opts.loss_chunk)
        return lp.reshape(batch["inputs"].shape)                          # [B, 2, T]

    def pair_loss(trainable, frozen, batch, norms):
        w = batch["weights"].astype(jnp.float32)
        lora_on = opts.lora is not None
        params = frozen if lora_on else trainable
        lp = logps(params, (trainable, opts.lora.scale) if lora_on else None, batch)
        seq = jnp.sum(lp * w, axis=-1)                                    # [B, 2]
        n = jnp.sum(w, axis=-1)
        valid = jnp.all(n > 0, axis=-1).astype(jnp.float32)
        if objective in REFERENCE_OBJECTIVES:
            ref = jax.lax.stop_gradient(logps(frozen, None, batch))       # adapters off / initial
            ratio = seq - jnp.sum(ref * w, axis=-1)
            delta = ratio[:, 0] - ratio[:, 1]
            if objective == "dpo":
                per_pair = -jax.nn.log_sigmoid(opts.beta * delta)
            else:
                avg = ratio / jnp.maximum(n, 1.0)
                per_pair = (avg[:, 0] - avg[:, 1] - 1.0 / (2.0 * opts.beta)) ** 2
            loss = jnp.sum(per_pair * valid) / norms["pairs"]
            rewards = opts.beta * jax.lax.stop_gradient(ratio)
            extra = {}
        else:  # orpo
            avg = seq / jnp.maximum(n, 1.0)
            log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
            ratio = jax.nn.log_sigmoid(log_odds)
            real = (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)
            nll = -jnp.sum(lp[:, 0] * real) / norms["chosen_tokens"]
            odds_term = jnp.sum(ratio * valid) / norms["pairs"]
            loss = nll - opts.orpo_lambda * odds_term
            rewards = opts.orpo_lambda * jax.lax.stop_gradient(avg)
            extra = {"nll": jax.lax.stop_gradient(nll),
                     "log_odds_ratio": jax.lax.stop_gradient(odds_term)}
        margin = rewards[:, 0] - rewards[:, 1]
        sums = {"reward_chosen": jnp.sum(rewards[:, 0] * valid),
                "reward_rejected": jnp.sum(rewards[:, 1] * valid),
                "reward_margin": jnp.sum(margin * valid),
                "reward_accuracy": jnp.sum((margin > 0) * valid),
                "logp_chosen": jnp.sum(jax.lax.stop_gradient(seq[:, 0]) * valid),
                "logp_rejected": jnp.sum(jax.lax.stop_gradient(seq[:, 1]) * valid)}
        return loss, (sums, extra)
    return pair_loss


def make_preference_step(cfg: LlamaConfig, optimizer: optax.GradientTransformation,
                         lr_schedule: optax.Schedule, opts: StepOptions,
                         constrain=None) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` for a pair batch [B, 2, T]."""
    grad_fn = jax.value_and_grad(make_pair_loss(cfg, opts, constrain), has_aux=True)
    accum = opts.grad_accum

    def train_step(state: TrainState, batch: dict):
        norms = batch_norms(batch)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, state.frozen, batch, norms)
        else:
            def body(carry, mb):
                out = grad_fn(state.params, state.frozen, mb, norms)
                return jax.tree.map(jnp.add, carry, out), None
            zero = jax.eval_shape(grad_fn, state.params, state.frozen,
                                  jax.tree.map(lambda x: x[:x.shape[0] // accum], batch), norms)
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            ((loss, aux), grads), _ = jax.lax.scan(
                body, zero, micro_batches(batch, accum, constrain))
        sums, extra = aux
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": lr_schedule(state.step),
                   "loss_tokens": jnp.sum(batch["weights"]),
                   "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
                   **{k: v / norms["pairs"] for k, v in sums.items()}, **extra}
        return TrainState(state.step + 1, params, opt_state, state.frozen), metrics
    return train_step


def make_preference_eval(cfg: LlamaConfig, opts: StepOptions, constrain=None) -> Callable:
    """``(state, batch) -> metrics``: the loss and :data:`PAIR_METRICS` means of a
    held-out pair batch, and its ``pairs`` count (to weigh batches by)."""
    pair_loss = make_pair_loss(cfg, opts, constrain)

    def eval_step(state: TrainState, batch: dict):
        norms = batch_norms(batch)
        loss, (sums, _) = pair_loss(state.params, state.frozen, batch, norms)
        return {"loss": loss, "pairs": norms["pairs"],
                **{k: v / norms["pairs"] for k, v in sums.items()}}
    return eval_step
