"""Context parallelism (meditron_jax/kernels/context.py) on 8 CPU devices: the sequence split
over a `context` mesh axis gives the unsharded model's logits, loss and AdamW step (1e-5 of
scale, float32) at context sizes 2, 4 and 8 on rows with and without packing; a prompt
prefilled with context parallelism then decoded greedily gives the single-device tokens;
the load-balanced order gives every device the same causal work; nothing [T, T] is built;
bad lengths and attention paths that cannot split the sequence are one-line errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.errors import UserError
from meditron_jax.kernels import XLA, select, xla
from meditron_jax.kernels.context import SequenceOrder, natural_order
from meditron_jax.model import forward, init_params
from meditron_jax.model.kvcache import KVCache
from meditron_jax.model.config import preset
from sharding import (INFER_RULES, PREFILL_RULES, TRAIN_RULES, activation_constrainer,
                      check_sequence, describe, make_mesh, param_shardings, parse_mesh_spec,
                      place, step_kernels)
from tests.sharding_cases import assert_close, gather, packed_batch
from train.config import OptimSection
from train.optim import make_optimizer, schedule
from train.step import (StepOptions, abstract_state, batch_shardings, init_state,
                        jit_train_step, make_train_step, state_shardings)

# tiny family, 8 query / 4 KV heads (tensor=2 divides both), embed 64 (fsdp x context = 8)
CFG = preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4)
BATCH, SEQ = 4, 32          # SEQ: a multiple of 2 x 8 (context=8 holds two chunks of 2)
MESHES = (("fsdp=2,context=4", "full"), ("data=2,context=2,tensor=2", "none"))


def make_batch() -> dict[str, np.ndarray]:
    """Row 0: three packed documents; row 1: two and right padding; rows 2-3: one each."""
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, CFG.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int32)
    segments = np.ones((BATCH, SEQ), np.int32)
    segments[0, 9:] = 2
    segments[0, 21:] = 3
    segments[1, 14:] = 2
    segments[1, 27:] = 0
    return packed_batch(tokens, segments)


@pytest.fixture(scope="module")
def host_params():
    params = jax.jit(lambda key: init_params(CFG, key, std=0.25))(jax.random.key(5))
    return jax.tree.map(np.asarray, params)


def forward_and_step(params, mesh, kernels, remat: str) -> dict[str, np.ndarray]:
    """Logits, loss and params after one AdamW step (as tests/sharding_cases.py, with the
    step's kernels given)."""
    constrain = activation_constrainer(mesh, TRAIN_RULES)
    batch = place(make_batch(), batch_shardings(mesh, TRAIN_RULES))
    logits = jax.jit(lambda p, b: forward(
        p, b["inputs"], CFG, positions=b["positions"], segment_ids=b["segment_ids"],
        kernels=kernels, constrain=constrain)[0])(params, batch)
    optim = OptimSection(lr=1e-3, warmup_steps=0, eps=1e-3)   # eps: see sharding_cases
    optimizer = make_optimizer(optim, total_steps=10)
    opts = StepOptions(compute_dtype=jnp.float32, remat=remat, kernels=kernels)
    shardings = state_shardings(CFG, abstract_state(CFG, optimizer), mesh, TRAIN_RULES)
    state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=shardings)(params)
    step = jit_train_step(make_train_step(CFG, optimizer, schedule(optim, 10), opts, constrain),
                          shardings, mesh, TRAIN_RULES)
    state, metrics = step(state, batch)
    out = {"logits": gather(logits), "loss": gather(metrics["loss"])}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        out["param/" + "/".join(str(k.key) for k in path)] = gather(leaf)
    return out


@pytest.fixture(scope="module")
def reference(host_params):
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    params = place(host_params, param_shardings(CFG, mesh, TRAIN_RULES))
    return forward_and_step(params, mesh, XLA, "none")


@pytest.mark.parametrize("spec, remat", MESHES)
def test_context_parallel_equals_single_device(spec, remat, host_params, reference):
    mesh = make_mesh(spec)
    kernels = step_kernels("auto", mesh, TRAIN_RULES, packed=True)
    assert kernels.context_axis == "context" and kernels.attention == "xla"
    params = place(host_params, param_shardings(CFG, mesh, TRAIN_RULES))
    # weights are sharded over context too (like fsdp): embed splits over fsdp x context
    q = params["layers"]["q"]
    assert q.addressable_shards[0].data.shape[1] == CFG.hidden_size // (
        mesh.shape["context"] * dict(mesh.shape).get("fsdp", 1))
    got = forward_and_step(params, mesh, kernels, remat)
    assert_close(got, reference)
    assert np.max(np.abs(got["logits"][0] - reference["logits"][0])) > 0  # not the same program


def test_the_step_moves_every_weight(reference, host_params):
    for path, before in jax.tree_util.tree_flatten_with_path(host_params)[0]:
        name = "param/" + "/".join(str(k.key) for k in path)
        assert np.max(np.abs(reference[name] - before)) > 1e-4, name


def test_context_8_logits_equal_single_device(host_params, reference):
    mesh = make_mesh("context=8")
    kernels = step_kernels("xla", mesh, TRAIN_RULES)
    params = place(host_params, param_shardings(CFG, mesh, TRAIN_RULES))
    batch = place(make_batch(), batch_shardings(mesh, TRAIN_RULES))
    logits = jax.jit(lambda p, b: forward(
        p, b["inputs"], CFG, positions=b["positions"], segment_ids=b["segment_ids"],
        kernels=kernels, constrain=activation_constrainer(mesh, TRAIN_RULES))[0])(params, batch)
    assert_close({"logits": np.asarray(logits)}, {"logits": reference["logits"]})


def greedy(params, mesh, prompt, steps, prefill_kernels, prefill_rules, decode_rules):
    """Prefill ``prompt`` into an empty cache, then ``steps`` greedy tokens one at a time."""
    pre = activation_constrainer(mesh, prefill_rules) if mesh is not None else None
    dec = activation_constrainer(mesh, decode_rules) if mesh is not None else None
    cache = KVCache.init(CFG, prompt.shape[0], prompt.shape[1] + steps)
    prefill = jax.jit(lambda p, t, c: forward(p, t, CFG, cache=c, prefill=True,
                                              kernels=prefill_kernels, constrain=pre))
    decode = jax.jit(lambda p, t, c: forward(p, t[:, None], CFG, cache=c, constrain=dec))
    logits, cache = prefill(params, prompt, cache)
    first = np.asarray(logits)
    tokens = [jnp.argmax(logits[:, -1], axis=-1)]
    for _ in range(steps - 1):
        logits, cache = decode(params, tokens[-1], cache)
        tokens.append(jnp.argmax(logits[:, -1], axis=-1))
    return first, np.stack([np.asarray(t) for t in tokens], axis=1)


def test_generation_after_a_context_parallel_prefill_equals_single_device(host_params):
    prompt = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 96), dtype=np.int32)
    one = jax.devices()[0]
    ref_logits, ref_tokens = greedy(jax.device_put(host_params, one), None,
                                    jax.device_put(prompt, one), 8, XLA, None, None)
    mesh = make_mesh("data=2,context=4")
    kernels = step_kernels("auto", mesh, PREFILL_RULES)
    assert kernels.context_axis == "context"
    params = place(host_params, param_shardings(CFG, mesh, INFER_RULES))
    logits, tokens = greedy(params, mesh, place(prompt, PREFILL_RULES.sharding(
        mesh, ("batch", "seq"))), 8, kernels, PREFILL_RULES, INFER_RULES)
    assert_close({"logits": logits}, {"logits": ref_logits})
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert len(set(ref_tokens[0].tolist())) > 1   # a real continuation, not one token repeated


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_the_balanced_order_gives_every_device_the_same_causal_work(shards):
    t = 16 * shards
    order = SequenceOrder(shards)
    slots = order.arrange(np.arange(t)[None])[0]
    np.testing.assert_array_equal(order.restore(order.arrange(
        np.arange(3 * t).reshape(1, t, 3)))[0], np.arange(3 * t).reshape(t, 3))
    np.testing.assert_array_equal(np.asarray(order.arrange(jnp.arange(t)[None]))[0], slots)
    per_device = slots.reshape(shards, -1)
    c = t // (2 * shards)
    for r, held in enumerate(per_device):          # device r holds chunks r and 2C-1-r
        want = np.concatenate([np.arange(r * c, (r + 1) * c),
                               np.arange((2 * shards - 1 - r) * c, (2 * shards - r) * c)])
        np.testing.assert_array_equal(held, want)
        assert natural_order(shards, True)[2 * r] == r
    work = (per_device + 1).sum(axis=1)            # causal (query, key) pairs per device
    assert len(set(work.tolist())) == 1
    contiguous = (np.arange(t).reshape(shards, -1) + 1).sum(axis=1)
    assert contiguous[-1] > contiguous[0] * (2 * shards - 2)  # what balancing removes


def test_blockwise_xla_attention_equals_the_dense_path(monkeypatch):
    """From xla.BLOCKWISE_FROM tokens the cache-free path is blockwise (no [T, T] mask):
    same values and gradients as the dense path, on packed rows with padding."""
    b, t, n, kv, h = 2, 384, 2, 1, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q, w = (jax.random.normal(k_, (b, t, n, h)) for k_ in keys[:2])
    k, v = (jax.random.normal(k_, (b, t, kv, h)) for k_ in keys[2:])
    seg = np.ones((b, t), np.int32)
    seg[0, 150:] = 2
    seg[1, 350:] = 0

    def run():
        f = lambda *a: jnp.sum(xla.causal_attention(*a, seg) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
    dense = run()
    monkeypatch.setattr(xla, "BLOCKWISE_FROM", 256)
    blockwise = run()
    for got, want in zip(jax.tree.leaves(blockwise), jax.tree.leaves(dense)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.max(np.abs(want))))


def _big_dims(jaxpr, limit):
    """Shapes of every value in ``jaxpr`` (sub-jaxprs included) with two dims >= ``limit``."""
    found = []
    for eqn in jaxpr.eqns:
        for var in list(eqn.outvars) + [v for v in eqn.invars if hasattr(v, "aval")]:
            shape = getattr(var.aval, "shape", ())
            if sum(d >= limit for d in shape) >= 2:
                found.append((str(eqn.primitive), shape))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _big_dims(inner, limit)
    return found


@pytest.mark.parametrize("spec", ["fsdp=1", "context=4"])
def test_a_long_row_never_builds_a_t_by_t_array(spec):
    """The training loss and its gradient at 16384 tokens (traced, not run): no value
    anywhere has two dims of 2048 or more: no [T, T] mask or logits, nor [T/C, T]."""
    cfg = CFG.replace(max_position_embeddings=32768)
    t = 16384
    mesh = make_mesh(spec, devices=jax.devices()[:4] if spec != "fsdp=1" else jax.devices()[:1])
    kernels = step_kernels("auto", mesh, TRAIN_RULES)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    seg = jnp.ones((1, t), jnp.int32)

    def loss(p, tokens):
        logits = forward(p, tokens, cfg, segment_ids=seg, kernels=kernels,
                         constrain=activation_constrainer(mesh, TRAIN_RULES), remat="full")[0]
        return jnp.mean(logits[..., 0])
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, jax.ShapeDtypeStruct((1, t), jnp.int32))
    assert _big_dims(jaxpr.jaxpr, 2048) == []
    # the check can fail: the dense path (below BLOCKWISE_FROM) builds [T, T]
    short = jax.make_jaxpr(lambda q: xla.causal_attention(q, q, q, seg[:, :4096]))(
        jax.ShapeDtypeStruct((1, 4096, 2, 8), jnp.float32))
    assert _big_dims(short.jaxpr, 2048)


def test_bad_inputs_are_one_line_errors():
    mesh = make_mesh("fsdp=2,context=4")
    kernels = step_kernels("xla", mesh, TRAIN_RULES)
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    with pytest.raises(UserError, match=r"sequence length 20 is not divisible by 2 x "
                                        r"context=4 \(= 8") as err:
        jax.eval_shape(lambda p, t: forward(p, t, CFG, kernels=kernels), params,
                       jax.ShapeDtypeStruct((2, 20), jnp.int32))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="sequence length 36 is not divisible"):
        check_sequence(36, mesh, TRAIN_RULES)
    check_sequence(40, mesh, TRAIN_RULES)
    check_sequence(36, mesh, INFER_RULES)            # no sequence split: any length
    for attention in ("splash", "cudnn"):
        with pytest.raises(UserError, match=f"--attention {attention} cannot take a sequence "
                                            "split over mesh axis context=4"):
            select(attention, mesh=mesh, context_axis="context", interpret=True)


def test_mesh_specs_with_a_context_axis():
    assert parse_mesh_spec("data=1,fsdp=2,context=4", 8) == {
        "data": 1, "fsdp": 2, "context": 4, "tensor": 1}
    assert parse_mesh_spec("context=1,fsdp=-1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh_spec("fsdp=2,context=-1", 8)["context"] == 4
    assert describe(make_mesh("fsdp=2,context=4")) == "data=1,fsdp=2,context=4,tensor=1"
    assert describe(make_mesh("fsdp=8")) == "data=1,fsdp=8,tensor=1"   # unchanged without it
    mesh = make_mesh("data=2,context=4")
    assert TRAIN_RULES.spec(("batch", "seq"), mesh) == jax.sharding.PartitionSpec("data", "context")
    assert INFER_RULES.spec(("batch", "seq"), mesh) == jax.sharding.PartitionSpec("data")
    with pytest.raises(UserError, match="AXIS in data, fsdp, tensor or context"):
        parse_mesh_spec("ring=2", 8)


class _Chars:
    """One id per character (the data tests' tokenizer)."""
    bos_id, eos_ids = 1, (2,)

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [3 + (ord(c) % 200) for c in text]


def test_packing_rows_of_131072_tokens_builds_nothing_of_t_by_t():
    """The data pipeline's packing at the long-context length (train/data.py, grain's
    first-fit packer): a [1, 131072] row of whole documents with segment ids and positions,
    and a host-memory peak far below one [T, T] mask (16 GiB of bools)."""
    import tracemalloc

    from train.config import DataSection
    from train.data import Loader
    t = 131072
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), size=n)) for n in rng.integers(3000, 9000, 40)]
    tracemalloc.start()
    batch = next(Loader(docs, _Chars(), 2, DataSection(seq_len=t, packing_bins=1), 1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 * 2 ** 20, peak
    seg, pos = batch["segment_ids"][0], batch["positions"][0]
    assert batch["inputs"].shape == (1, t) and seg.max() >= 10   # many documents in one row
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
    check_sequence(t, make_mesh("fsdp=2,context=4"), TRAIN_RULES)


def test_plan_counts_the_blockwise_path_at_its_dense_flops():
    """Cost analysis counts a loop body once, and the blockwise path's loops run a
    data-dependent number of times: ``plan`` counts FLOPs on the dense path (lowered only)."""
    from meditron_jax.kernels.xla import dense_for_counting
    from sharding.aot import step_flops
    t, n, h = 8192, 2, 16
    seg = jnp.ones((1, t), jnp.int32)
    args = (jax.ShapeDtypeStruct((1, t, n, h), jnp.float32),)

    def count():   # a fresh function each time: jit would reuse the first trace
        return step_flops(jax.jit(lambda q: xla.causal_attention(q, q, q, seg)), args)
    blockwise = count()
    with dense_for_counting():
        dense = count()
    full = 4 * t * t * n * h                     # QK^T and PV over the whole square
    assert 0.6 * full < dense < 0.7 * full       # 5/8 of it: chunks skip the upper blocks
    assert blockwise < dense / 10                # one tile per loop: what it would report
