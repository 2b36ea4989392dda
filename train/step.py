"""The train state and the one ``train_step(state, batch) -> (state, metrics)``.

The step is jitted once with in/out shardings derived from the abstract state (the
optimizer state's shardings follow the params', ``sharding.derived_shardings``) and
the state donated, so parameters and Adam moments are updated in place. Master weights
are float32; the forward casts each layer's weights to the compute dtype (bf16).

A batch is a dict of [B, T] arrays: ``inputs`` and ``targets`` (int32), ``weights``
(float32; 0 on padding and on SFT prompt tokens), ``segment_ids`` and ``positions``
(int32; packed rows); preference objectives (dpo, ipo, orpo: :mod:`train.objectives`)
take the same keys as [B, 2, T] pairs. Gradient accumulation splits B into ``grad_accum`` micro-batches
and divides the summed gradients by the total weight once, so 4 micro-batches of B
give the same update as one batch of 4B.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from meditron_jax.kernels import XLA, Kernels
from meditron_jax.model.config import LlamaConfig
from meditron_jax.model.lora import LoraConfig, init_lora, lora_logical_axes
from meditron_jax.model import abstract_params, forward, mask_padded_vocab
from sharding import (activation_constrainer, batch_sharding, check_batch, derived_shardings,
                      param_shardings, replicated, step_kernels, tree_shardings)
from sharding.rules import Rules
from train.config import OptimSection
from train.optim import make_optimizer, schedule

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
_BATCH_DTYPES = {"weights": jnp.float32}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array       # [] int32: optimizer updates done
    params: Any           # what is trained: the full params, or the LoRA adapters
    opt_state: Any
    frozen: Any = None    # the base params under LoRA (never updated); None otherwise


@dataclasses.dataclass(frozen=True)
class StepOptions:
    grad_accum: int = 1
    compute_dtype: Any = jnp.bfloat16
    remat: str = "full"
    kernels: Kernels = XLA         # attention path (sharding.step_kernels), fixed per step
    loss_chunk: int = 1024         # sequence positions per logits chunk (vocab is large)
    lora: LoraConfig | None = None
    objective: str = "sft"         # sft, or dpo | ipo | orpo on pair batches (train.objectives)
    beta: float = 0.1              # dpo / ipo
    orpo_lambda: float = 0.1       # orpo


def chunked_loss_sums(params, hidden, targets, weights, cfg: LlamaConfig, chunk: int,
                      head_grad: bool = True):
    """(sum of weighted next-token NLL, sum of weights) without the full [B,T,V] logits.

    The sequence is cut into chunks of at most ``chunk`` positions, so at most
    [B, chunk, V] float32 logits are alive (for Llama-3's 128k vocab the full logits of
    one 8k-token row would be 4 GiB). Under differentiation each chunk's gradients are
    computed in the forward pass while its logits are alive (:func:`_head_nll`), so the
    head is applied three times per chunk, not four as with recomputed logits.
    ``head_grad=False`` (LoRA: the head is frozen) skips the head's gradient.
    Padded vocabulary columns are masked out of every logsumexp, so their softmax
    weight and hence the gradient of the padded head/embedding rows is exactly zero
    (they stay zero under AdamW with weight decay).
    """
    t = hidden.shape[1]
    chunk = math.gcd(t, min(chunk, t))
    head = _Head(params["embed"].T if cfg.tie_word_embeddings else params["lm_head"],
                 cfg.vocab_size)
    nll = _head_nll(hidden, head.w.astype(hidden.dtype), targets, weights, chunk, head_grad,
                    head.static)
    return nll, jnp.sum(weights)


@dataclasses.dataclass(frozen=True)
class _Head:
    """The head's three products on [B, C, D] rows: ``w`` is [D, V]; ``vocab`` the true
    vocabulary (V may be padded beyond it)."""
    w: Any
    vocab: int

    @property
    def static(self) -> tuple[int]:
        return (self.vocab,)

    def logits(self, h):                       # [B, C, D] -> [B, C, V] float32
        return jnp.einsum("BTD,DV->BTV", h, self.w, preferred_element_type=jnp.float32)

    def d_hidden(self, dlogits):               # [B, C, V] -> [B, C, D] float32
        return jnp.einsum("BTV,DV->BTD", dlogits, self.w, preferred_element_type=jnp.float32)

    def d_weight(self, h, dlogits):            # -> [D, V] float32
        return jnp.einsum("BTD,BTV->DV", h, dlogits, preferred_element_type=jnp.float32)


def _split_chunks(chunk: int, *xs):
    """Each [B, T, ...] of ``xs`` -> [T/chunk, B, chunk, ...]."""
    return tuple(x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)
                 for x in xs)


def _merge_chunks(x):
    """[T/chunk, B, chunk, ...] -> [B, T, ...]."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunk_logits(h, head: _Head, tgt):
    """Per-position (logits [B,C,V] f32, logsumexp [B,C], NLL [B,C]) of one chunk."""
    logits = mask_padded_vocab(head.logits(h), head.vocab)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return logits, lse, lse - picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_nll(hidden, head, targets, weights, chunk: int, head_grad: bool, static: tuple):
    """sum(weights * NLL(hidden @ head, targets)), chunk by chunk over the sequence."""
    head = _Head(head, *static)

    def piece(xs):
        h, tgt, w = xs
        return jnp.sum(_chunk_logits(h, head, tgt)[2] * w)
    chunks = _split_chunks(chunk, hidden, targets, weights)
    return jnp.sum(jax.lax.map(piece, chunks))


def _head_nll_fwd(hidden, head, targets, weights, chunk: int, head_grad: bool, static: tuple):
    # d(sum w * NLL)/d logits = w * (softmax - onehot(target)): formed while the chunk's
    # logits are alive, then pushed through the head right away; only d hidden
    # [B,T,D], d head [D,V] and the per-position NLL are kept for the backward pass.
    shape = head.shape
    head = _Head(head, *static)

    def body(d_head, xs):
        h, tgt, w = xs
        logits, lse, nll = _chunk_logits(h, head, tgt)
        dlogits = jnp.exp(logits - lse[..., None])
        dlogits = dlogits - jax.nn.one_hot(tgt, logits.shape[-1], dtype=dlogits.dtype)
        dlogits = (dlogits * w[..., None]).astype(h.dtype)
        d_h = head.d_hidden(dlogits).astype(h.dtype)
        if head_grad:
            d_head = d_head + head.d_weight(h, dlogits)
        return d_head, (nll, d_h)
    chunks = _split_chunks(chunk, hidden, targets, weights)
    init = jnp.zeros(shape if head_grad else (), jnp.float32)
    d_head, (nll, d_h) = jax.lax.scan(body, init, chunks)
    nll, d_h = _merge_chunks(nll), _merge_chunks(d_h)
    return jnp.sum(nll * weights), (d_h, d_head, nll)


def _head_nll_bwd(chunk: int, head_grad: bool, static: tuple, res, g):
    d_h, d_head, nll = res
    d_head = (g * d_head).astype(d_h.dtype) if head_grad else None  # None: zero
    return (g.astype(d_h.dtype) * d_h, d_head, None, g * nll)


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)


def make_loss_sums(cfg: LlamaConfig, opts: StepOptions, constrain=None) -> Callable:
    """``loss_sums(trainable, frozen, batch) -> (nll_sum, weight_sum)``."""
    def loss_sums(trainable, frozen, batch):
        if opts.lora is not None:
            params, lora = frozen, (trainable, opts.lora.scale)
        else:
            params, lora = trainable, None
        hidden, _ = forward(params, batch["inputs"], cfg, positions=batch["positions"],
                            segment_ids=batch["segment_ids"], dtype=opts.compute_dtype,
                            remat=opts.remat, kernels=opts.kernels,
                            constrain=constrain, return_hidden=True, lora=lora)
        return chunked_loss_sums(params, hidden, batch["targets"],
                                 batch["weights"].astype(jnp.float32), cfg, opts.loss_chunk,
                                 head_grad=opts.lora is None)
    return loss_sums


def micro_batches(batch: dict, accum: int, constrain=None) -> dict:
    """[B, ...] arrays -> [accum, B/accum, ...]. Row i*accum + j goes to micro-batch j, so
    every micro-batch keeps the batch's sharding over the data axes (a contiguous split
    would not)."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        if constrain is not None:
            x = constrain(x, ("batch", None) + (None,) * (x.ndim - 3) + ("seq",))
        return x.swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(cfg: LlamaConfig, optimizer: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, opts: StepOptions, constrain=None) -> Callable:
    if opts.objective != "sft":  # preference pairs
        from train.objectives import make_preference_step
        return make_preference_step(cfg, optimizer, lr_schedule, opts, constrain)
    loss_sums = make_loss_sums(cfg, opts, constrain)
    grad_fn = jax.value_and_grad(lambda p, f, b: loss_sums(p, f, b), has_aux=True)
    accum = opts.grad_accum

    def sums_and_grads(params, frozen, batch):
        (nll, count), grads = grad_fn(params, frozen, batch)
        return nll, count, grads

    def train_step(state: TrainState, batch: dict):
        if accum == 1:
            nll, count, grads = sums_and_grads(state.params, state.frozen, batch)
        else:
            micro = micro_batches(batch, accum, constrain)

            def body(carry, mb):
                nll_acc, count_acc, grads_acc = carry
                nll, count, grads = sums_and_grads(state.params, state.frozen, mb)
                return (nll_acc + nll, count_acc + count,
                        jax.tree.map(jnp.add, grads_acc, grads)), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (nll, count, grads), _ = jax.lax.scan(
                body, (jnp.float32(0), jnp.float32(0), zeros), micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": nll / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state.step),
            "loss_tokens": count,
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, state.frozen), metrics
    return train_step


def make_eval_step(cfg: LlamaConfig, opts: StepOptions, constrain=None,
                   quantize: str | None = None) -> Callable:
    """``(state, batch) -> (nll_sum, weight_sum)`` on the held-out batch. ``quantize``
    ("int8", full fine-tuning only): on an int8 copy of the current weights
    (:func:`meditron_jax.model.quant.quantize_params`, made inside the step and dropped
    after it), the loss inference with ``--quantize int8`` would see."""
    if opts.objective != "sft":  # preference pairs: a dict of held-out metrics
        from train.objectives import make_preference_eval
        return make_preference_eval(cfg, opts, constrain)
    loss_sums = make_loss_sums(cfg, opts, constrain)
    if quantize is None:
        return lambda state, batch: loss_sums(state.params, state.frozen, batch)
    if opts.lora is not None:
        raise ValueError("int8 evaluation quantizes full fine-tuning weights, not LoRA")
    from meditron_jax.model.quant import materialize, quantize_params

    def quantized_eval(state, batch):
        params = quantize_params(state.params, quantize)
        if "lm_head" in params:  # the chunked loss takes a plain [D, V] head
            params = {**params, "lm_head": materialize(params["lm_head"], jnp.float32)}
        return loss_sums(params, state.frozen, batch)
    return quantized_eval


# ---- state, shardings, jit ----------------------------------------------------------------
def init_state(params, optimizer: optax.GradientTransformation, frozen=None) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), frozen)


def abstract_state(cfg: LlamaConfig, optimizer: optax.GradientTransformation,
                   param_dtype=jnp.float32, lora: LoraConfig | None = None,
                   reference_dtype=None) -> TrainState:
    """``reference_dtype`` (full fine-tuning with a DPO/IPO reference): ``frozen`` holds
    the initial weights in that dtype."""
    base = abstract_params(cfg, param_dtype)
    if lora is None:
        ref = None if reference_dtype is None else abstract_params(cfg, reference_dtype)
        return jax.eval_shape(lambda p, r: init_state(p, optimizer, r), base, ref)
    adapters = jax.eval_shape(lambda: init_lora(cfg, lora, jax.random.key(0)))
    return jax.eval_shape(lambda a, f: init_state(a, optimizer, f), adapters, base)


def state_shardings(cfg: LlamaConfig, abstract: TrainState, mesh: Mesh, rules: Rules,
                    lora: LoraConfig | None = None) -> TrainState:
    """Params by their logical axes; Adam moments like their params; scalars replicated."""
    base = param_shardings(cfg, mesh, rules)
    trained = base if lora is None else tree_shardings(lora_logical_axes(cfg, lora), mesh,
                                                       rules.for_model(cfg, mesh))
    return TrainState(
        step=replicated(mesh),
        params=trained,
        opt_state=derived_shardings(abstract.opt_state, abstract.params, trained, mesh),
        frozen=None if lora is None and abstract.frozen is None else base,
    )


def batch_shardings(mesh: Mesh, rules: Rules) -> dict:
    return {k: batch_sharding(mesh, rules) for k in BATCH_KEYS}


def abstract_batch(batch: int, seq: int, mesh: Mesh, rules: Rules, pairs: bool = False) -> dict:
    """[batch, seq] rows, or with ``pairs`` [batch, 2, seq] (chosen, rejected)."""
    sh = batch_sharding(mesh, rules)
    shape = (batch, 2, seq) if pairs else (batch, seq)
    return {k: jax.ShapeDtypeStruct(shape, _BATCH_DTYPES.get(k, jnp.int32), sharding=sh)
            for k in BATCH_KEYS}


def jit_train_step(step_fn: Callable, shardings: TrainState, mesh: Mesh, rules: Rules):
    """Jitted once; the state is donated (updated in place), metrics come back replicated."""
    return jax.jit(step_fn, in_shardings=(shardings, batch_shardings(mesh, rules)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(eval_fn: Callable, shardings: TrainState, mesh: Mesh, rules: Rules):
    return jax.jit(eval_fn, in_shardings=(shardings, batch_shardings(mesh, rules)),
                   out_shardings=replicated(mesh))


def with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_train_step(cfg: LlamaConfig, mesh: Mesh, rules: Rules, *, batch: int, seq: int,
                        remat: str = "full", param_dtype=jnp.float32,
                        compute_dtype=jnp.bfloat16, grad_accum: int = 1,
                        lora: LoraConfig | None = None, optim: OptimSection | None = None,
                        attention: str = "auto", objective: str = "sft"):
    """The real train step and ShapeDtypeStructs (with shardings) of its arguments, so
    ``fn.lower(*args).compile()`` plans memory and FLOPs without allocating anything.
    ``objective`` dpo/ipo/orpo: the preference step on ``batch`` pairs of two ``seq`` rows
    (dpo/ipo with full fine-tuning: the reference weights, in the compute dtype, too)."""
    check_batch(batch // grad_accum, mesh, rules)
    optim = optim or OptimSection()
    optimizer = make_optimizer(optim, total_steps=1000)
    opts = StepOptions(grad_accum=grad_accum, compute_dtype=compute_dtype, remat=remat,
                       kernels=step_kernels(attention, mesh, rules, packed=True,
                                            dtype=compute_dtype, head_dim=cfg.head_dim),
                       lora=lora, objective=objective)
    abstract = abstract_state(cfg, optimizer, param_dtype, lora,
                              reference_dtype(objective, lora, compute_dtype))
    shardings = state_shardings(cfg, abstract, mesh, rules, lora)
    step = make_train_step(cfg, optimizer, schedule(optim, 1000), opts,
                           activation_constrainer(mesh, rules))
    fn = jit_train_step(step, shardings, mesh, rules)
    return fn, (with_shardings(abstract, shardings),
                abstract_batch(batch, seq, mesh, rules, pairs=objective != "sft"))


def reference_dtype(objective: str, lora: LoraConfig | None, compute_dtype):
    """The dtype of a separate reference copy: only full fine-tuning with dpo/ipo keeps
    one (LoRA's reference is the frozen base; sft and orpo need none)."""
    return compute_dtype if objective in ("dpo", "ipo") and lora is None else None

