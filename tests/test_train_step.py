"""The train step against PyTorch, gradient accumulation, and the AOT entry point for plan."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.model.config import LlamaConfig, preset
from meditron_jax.io.hf_keys import params_from_hf
from meditron_jax.model import init_params
from sharding import TRAIN_RULES, make_mesh
from tests.hf_fixtures import make_hf_model, state_dict_numpy
from train.config import OptimSection
from train.optim import make_optimizer, schedule
from train.step import (StepOptions, abstract_state, abstract_train_step, init_state,
                        jit_train_step, make_train_step, state_shardings)

OPT = OptimSection(lr=1e-3, warmup_steps=0, decay="constant", weight_decay=0.1, b1=0.9,
                   b2=0.95, eps=1e-8, clip_norm=1.0)


@functools.lru_cache(maxsize=None)
def compiled_step(cfg, accum, loss_chunk=1024):
    """One jitted step per (model, accumulation, loss chunk), shared by the tests."""
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    optimizer = make_optimizer(OPT, total_steps=10)
    opts = StepOptions(grad_accum=accum, compute_dtype=jnp.float32, remat="full",
                       loss_chunk=loss_chunk)
    abstract = abstract_state(cfg, optimizer, jnp.float32)
    sh = state_shardings(cfg, abstract, mesh, TRAIN_RULES)
    step = jit_train_step(make_train_step(cfg, optimizer, schedule(OPT, 10), opts), sh, mesh,
                          TRAIN_RULES)
    return step, optimizer, sh


def run_step(cfg, params, batch, *, accum=1, loss_chunk=1024):
    step, optimizer, sh = compiled_step(cfg, accum, loss_chunk)
    state = jax.device_put(init_state(jax.tree.map(jnp.asarray, params), optimizer), sh)
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return jax.device_get(new.params), {k: float(v) for k, v in metrics.items()}


def torch_step(model, seq, attn, labels):
    import torch
    opt = OPT
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "norm" in name or "embed_tokens" in name else decay).append(p)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps)
    model.train()
    out = model(torch.as_tensor(seq), attention_mask=torch.as_tensor(attn),
                labels=torch.as_tensor(labels))
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    adamw.step()
    return float(out.loss.detach()), float(norm)


def hf_batch(seq, attn, trained):
    """HF inputs (full sequences, labels -100 where untrained) -> our shifted batch."""
    t = seq.shape[1] - 1
    return {"inputs": seq[:, :t], "targets": seq[:, 1:],
            "weights": trained[:, 1:].astype(np.float32),
            "segment_ids": attn[:, :t].astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (seq.shape[0], t)).copy()}


# sft_mask also cuts the loss into 4 chunks of 4 positions (the head's gradient is then
# summed over chunks in the loss's forward pass).
@pytest.mark.parametrize("sft", [False, True], ids=["full", "sft_mask_4_loss_chunks"])
def test_one_step_matches_torch_adamw(sft):
    model = make_hf_model(std=0.25, seed=1)
    cfg = LlamaConfig.from_hf(model.config.to_dict())
    # copies: the numpy views would follow torch's in-place update
    before = params_from_hf({k: v.copy() for k, v in state_dict_numpy(model).items()}, cfg)
    rng = np.random.default_rng(0)
    seq = rng.integers(3, cfg.vocab_size, (4, 17)).astype(np.int32)
    attn = np.ones_like(seq)
    attn[1, 12:] = 0  # right padding
    attn[2, 9:] = 0
    trained = attn.copy()
    if sft:  # loss only on the "completion": tokens after a per-row prompt length
        for row, prompt_len in enumerate((6, 4, 5, 9)):
            trained[row, :prompt_len] = 0
    labels = np.where(trained == 1, seq, -100).astype(np.int64)
    ours, metrics = run_step(cfg, before, hf_batch(seq, attn, trained),
                             loss_chunk=4 if sft else 1024)
    loss, norm = torch_step(model, seq.astype(np.int64), attn.astype(np.int64), labels)
    after = params_from_hf(state_dict_numpy(model), cfg)

    assert norm > OPT.clip_norm  # clipping was active, so it is checked too
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    assert metrics["loss_tokens"] == trained[:, 1:].sum()
    for (path, got), want, old in zip(jax.tree_util.tree_leaves_with_path(ours),
                                      jax.tree.leaves(after), jax.tree.leaves(before)):
        name = jax.tree_util.keystr(path)
        moved = np.linalg.norm(want - old)
        assert moved > 0, name
        # relative to the parameter, and (much stricter) to the step's own size
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), name
        assert np.linalg.norm(got - want) <= 1e-3 * moved, name


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tied):
    """chunked_loss_sums' hand-written backward (gradients formed while each chunk's
    logits are alive) against autodiff of the plain formula: value, d hidden, d head
    (through embed when tied) for 1, 3 and 12 chunks; head_grad=False zeroes d head."""
    import dataclasses

    from train.step import chunked_loss_sums
    cfg = dataclasses.replace(preset("tiny"), tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.key(0), std=0.25)
    params = {k: v for k, v in params.items() if k in ("embed", "lm_head")}
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 12, cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 12)) < 0.7, jnp.float32)

    def plain(p, h):
        head = p["embed"].T if tied else p["lm_head"]
        logits = h @ head
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights)

    want, (want_p, want_h) = jax.value_and_grad(plain, argnums=(0, 1))(params, hidden)
    for chunk in (12, 4, 1):
        for head_grad in (True, False):
            fn = lambda p, h: 2.0 * chunked_loss_sums(  # noqa: E731 (cotangent 2)
                p, h, targets, weights, cfg, chunk, head_grad)[0]
            got, (got_p, got_h) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(params, hidden)
            np.testing.assert_allclose(got, 2 * want, rtol=1e-5)
            np.testing.assert_allclose(got_h, 2 * want_h, rtol=1e-4, atol=1e-5)
            for name in got_p:
                expect = 2 * want_p[name] if head_grad else np.zeros_like(want_p[name])
                np.testing.assert_allclose(got_p[name], expect, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{name} chunk={chunk}")


def _random_batch(cfg, rows, t, seed):
    rng = np.random.default_rng(seed)
    weights = (rng.random((rows, t)) < 0.7).astype(np.float32)  # uneven tokens per row
    seg = np.ones((rows, t), np.int32)
    seg[:, t // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
    return {"inputs": rng.integers(0, cfg.vocab_size, (rows, t)).astype(np.int32),
            "targets": rng.integers(0, cfg.vocab_size, (rows, t)).astype(np.int32),
            "weights": weights, "segment_ids": seg,
            "positions": np.broadcast_to(pos, (rows, t)).copy()}


def test_grad_accumulation_equals_one_big_batch():
    """4 micro-batches of 1 row against one batch of 4 rows (same shapes as the torch
    test, so the accum=1 step is already compiled)."""
    cfg = LlamaConfig.from_hf(make_hf_model(std=0.25, seed=2).config.to_dict())
    params = jax.device_get(init_params(cfg, jax.random.key(0), std=0.25))
    batch = _random_batch(cfg, 4, 16, seed=1)
    one, m1 = run_step(cfg, params, batch, accum=1)
    four, m4 = run_step(cfg, params, batch, accum=4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b, p in zip(jax.tree.leaves(four), jax.tree.leaves(one), jax.tree.leaves(params)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
        # Adam's first step is ~lr * g/|g|: entries with |g| near eps amplify the
        # summation-order noise, so the bound relative to the step itself is looser
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b - p)


def test_abstract_train_step_lowers_the_full_size_step_without_allocating():
    """The entry point ``plan`` uses: the real 8B step lowered from ShapeDtypeStructs
    (``plan`` compiles it; here lowering proves shapes and shardings line up)."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    fn, args = abstract_train_step(preset("meditron3-8b"), mesh, TRAIN_RULES, batch=8,
                                   seq=2048, grad_accum=2)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(args))
    state, batch = args
    assert state.params["layers"]["q"].shape == (32, 4096, 32, 128)
    assert state.params["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    mu = state.opt_state[1][0].mu["layers"]["q"]  # chain(clip, adamw): Adam's first moment
    assert mu.sharding == state.params["layers"]["q"].sharding
    assert batch["inputs"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert fn.lower(*args).as_text().count("stablehlo.while") >= 2  # accumulation + layers
    with pytest.raises(Exception, match="not divisible"):
        abstract_train_step(preset("tiny"), mesh, TRAIN_RULES, batch=8, seq=32, grad_accum=4)
