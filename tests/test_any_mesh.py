"""Any vocabulary, any KV head count, any mesh (on 8 fake CPU devices).

Two random transformers models, saved and converted with ``convert_to_native``:
``v517`` has 517 tokens (padded to 640 inside) and 4 query / 2 KV heads; ``mqa`` has
300 tokens (padded to 384) and one KV head. On ``data=2,tensor=2`` and on ``tensor=4``
(which 1 or 2 KV heads do not fill: k/v weights replicated, a cache holding each KV
head 4/kv times, one per device) greedy tokens, logits and scores equal transformers' and
the single-device run; padded tokens are never sampled; a train step on
``data=2,fsdp=2,tensor=2`` equals one device and leaves the padded rows exactly zero;
``plan`` compiles the 8B decode loop at ``tensor=16`` (8 KV heads).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import sharding
from infer.engine import Generator, abstract_decode_step
from infer.grouped_score import GroupedScorer, ScoreGroup
from infer.sampling import Sampling
from infer.score import ScoreRequest
from meditron_jax.model.config import preset
from meditron_jax.io.convert import convert_to_native
from meditron_jax.io.loading import load_model
from meditron_jax.model import (cross_entropy, unstack_layers, forward, init_params,
                                padded_vocab_size)
from tests import hf_fixtures
from tests.sharding_cases import assert_close, forward_and_step, make_batch
from train.step import chunked_loss_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"v517": dict(vocab_size=517), "mqa": dict(vocab_size=300, num_key_value_heads=1)}
CASES = [("v517", None), ("v517", "data=2,tensor=2"), ("v517", "tensor=4"),
         ("mqa", None), ("mqa", "tensor=4")]
MESH_CASES = [c for c in CASES if c[1]]
NEW = 16


def prompts(vocab: int) -> list[list[int]]:
    return [[1, 5, 9, 33], [1, 7, 100, 4, 8, 9, 10, 11, vocab - 1, 13, 14], [1, vocab - 2],
            [1, 3, 3, 3, 3, vocab - 1]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (transformers model, native checkpoint converted from its snapshot)."""
    out = {}
    for name, overrides in MODELS.items():
        hf = hf_fixtures.make_hf_model(**overrides)
        snapshot = tmp_path_factory.mktemp(f"{name}_hf")
        hf.save_pretrained(snapshot, safe_serialization=True)
        native = str(tmp_path_factory.mktemp(name) / "native")
        convert_to_native(str(snapshot), native, quiet=True)
        out[name] = (hf, native)
    return out


@functools.lru_cache(maxsize=None)
def _mesh(spec):
    return sharding.make_mesh(spec) if spec else None


@pytest.fixture(scope="module")
def loaded(models):
    cache = {}

    def get(name, spec):
        if (name, spec) not in cache:
            mesh = _mesh(spec)
            cache[name, spec] = load_model(models[name][1], shardings=None if mesh is None else (
                lambda cfg: sharding.param_shardings(cfg, mesh, sharding.INFER_RULES)))
        return cache[name, spec]
    return get


@pytest.fixture(scope="module")
def hf_greedy(models):
    """transformers' greedy completions, one prompt at a time (no padding)."""
    def generate(hf, p):
        ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return ids[0, len(p):].tolist()
    return {name: [generate(hf, p) for p in prompts(hf.config.vocab_size)]
            for name, (hf, _) in models.items()}


@pytest.fixture(scope="module")
def greedy(loaded):
    """(name, mesh spec) -> our greedy completions; one device runs per-layer weights, as
    ``generate`` does there."""
    cache = {}

    def get(name, spec):
        if (name, spec) not in cache:
            model = loaded(name, spec)
            if spec is None:
                model = dataclasses.replace(model, params=unstack_layers(model.params))
            gen = Generator(model, _mesh(spec), batch_size=4)
            cache[name, spec] = [c.ids for c in gen.generate(prompts(model.cfg.vocab_size),
                                                            max_new_tokens=NEW)]
        return cache[name, spec]
    return get


def test_the_converted_checkpoints_are_padded_with_zeros(loaded):
    for name in MODELS:
        model = loaded(name, None)
        v, vp = model.cfg.vocab_size, padded_vocab_size(model.cfg)
        assert vp % 128 == 0 and vp > v
        assert model.params["embed"].shape[0] == model.params["lm_head"].shape[1] == vp
        assert not np.any(np.asarray(model.params["embed"])[v:])
        assert not np.any(np.asarray(model.params["lm_head"])[:, v:])


@pytest.mark.parametrize("name, spec", CASES)
def test_greedy_equals_transformers_and_one_device(greedy, hf_greedy, name, spec):
    got = greedy(name, spec)
    for ours, ref in zip(got, hf_greedy[name]):
        assert len(ours) == NEW and ours == ref   # no eos in these random models' runs
    assert got == greedy(name, None)


@pytest.mark.parametrize("name, spec", MESH_CASES)
def test_kv_weights_replicate_and_the_cache_splits(loaded, name, spec):
    """k/v weights replicate where tensor does not divide the KV heads; the cache holds
    each head tensor/kv times and keeps one head per device."""
    model, mesh = loaded(name, spec), _mesh(spec)
    tensor, kv = mesh.shape["tensor"], model.cfg.num_key_value_heads
    params = model.params
    assert params["layers"]["q"].sharding.spec == P(None, None, "tensor")
    assert params["embed"].sharding.spec == P("tensor")
    assert params["layers"]["k"].sharding.spec == (P() if kv % tensor else
                                                   P(None, None, "tensor"))
    _, (_, state, _) = abstract_decode_step(model.cfg, mesh, batch=4, max_len=32)
    heads = max(kv, tensor)
    assert state.cache.k.shape == (2, 4, heads, 32, model.cfg.head_dim)
    shard = state.cache.k.sharding.shard_shape(state.cache.k.shape)
    assert shard[2] == heads // tensor and shard[1] == 4 // mesh.shape["data"]


@pytest.mark.parametrize("name, spec", CASES)
def test_logits_equal_transformers(models, loaded, name, spec):
    model, hf = loaded(name, spec), models[name][0]
    tokens = np.asarray([prompts(model.cfg.vocab_size)[1] * 2], np.int32)
    mesh = _mesh(spec)
    constrain = None if mesh is None else sharding.activation_constrainer(
        mesh, sharding.INFER_RULES.for_model(model.cfg, mesh))
    ours = np.asarray(jax.jit(lambda p, t: forward(p, t, model.cfg, constrain=constrain)[0])(
        model.params, tokens))
    want = hf_fixtures.torch_logits(hf, tokens)
    assert ours.shape == want.shape == tokens.shape + (model.cfg.vocab_size,)
    diff = float(np.max(np.abs(ours - want)))
    print(f"\n{name} {spec}: max |dlogit| {diff:.2e} (logits up to {np.abs(want).max():.1f})")
    assert diff < 1e-4


def test_padded_tokens_are_never_sampled(loaded):
    """At temperature 100 the true logits are nearly flat: a padded column that was not
    masked (its logit is 0) would be drawn about 1 time in 5."""
    model = loaded("v517", "data=2,tensor=2")
    gen = Generator(model, _mesh("data=2,tensor=2"), batch_size=4)
    got = gen.generate(prompts(517) * 2, max_new_tokens=NEW, seed=1,
                       sampling=Sampling(temperature=100.0, top_p=0.999))
    ids = np.concatenate([c.ids for c in got])
    assert ids.size > 100 and ids.max() < 517 and ids.max() > 400   # draws span the vocab


def _hf_logprob(hf, context, continuation) -> tuple[float, bool]:
    seq = list(context) + list(continuation)
    logits = torch.tensor(hf_fixtures.torch_logits(hf, [seq])[0], dtype=torch.float64)
    logp = torch.log_softmax(logits, -1).numpy()
    rows = range(len(context) - 1, len(seq) - 1)
    return (float(sum(logp[i, seq[i + 1]] for i in rows)),
            all(int(np.argmax(logp[i])) == seq[i + 1] for i in rows))


@pytest.mark.parametrize("name, spec", MESH_CASES[:1] + MESH_CASES[-1:])
def test_scores_equal_transformers(models, loaded, hf_greedy, name, spec):
    model, hf = loaded(name, spec), models[name][0]
    v = model.cfg.vocab_size
    ctx = prompts(v)[1]
    conts = [(v - 1,), (4, 5, v - 2), tuple(hf_greedy[name][1][:3])]   # the last: greedy
    scorer = GroupedScorer(model, mesh=_mesh(spec), batch_size=2)
    singles = scorer.score([ScoreRequest(j, tuple(ctx), c) for j, c in enumerate(conts)])
    grouped = scorer.score_groups([ScoreGroup("q", tuple(ctx), tuple(conts))])[0]
    for cont, one, group in zip(conts, singles, grouped):
        want, want_greedy = _hf_logprob(hf, ctx, cont)
        assert abs(one.logprob - want) < 1e-4 and abs(group.logprob - want) < 1e-4
        assert one.greedy == group.greedy == want_greedy
    assert singles[-1].greedy


def test_train_step_with_a_padded_vocab_on_a_mesh_equals_one_device(loaded):
    """The state, loss and updated weights of one AdamW step (weight decay on) on
    data=2,fsdp=2,tensor=2 equal one device; the padded rows stay exactly zero; the loss
    equals cross-entropy over the true vocabulary only."""
    cfg = loaded("v517", None).cfg
    host = jax.tree.map(np.asarray, loaded("v517", None).params)
    results = {}
    for spec in ("fsdp=1", "data=2,fsdp=2,tensor=2"):
        mesh = sharding.make_mesh(spec, devices=jax.devices()[:1] if spec == "fsdp=1" else None)
        params = sharding.place(host, sharding.param_shardings(cfg, mesh, sharding.TRAIN_RULES))
        results[spec] = forward_and_step(cfg, params, mesh, sharding.TRAIN_RULES)
    assert_close(results["data=2,fsdp=2,tensor=2"], results["fsdp=1"])
    for out in results.values():
        assert out["logits"].shape[-1] == 517
        assert np.abs(out["param/embed"][:517] - host["embed"][:517]).max() > 1e-4   # trained
        assert not np.any(out["param/embed"][517:]) and not np.any(out["param/lm_head"][:, 517:])
    want = jax.jit(lambda p, b: cross_entropy(forward(
        p, b["inputs"], cfg, positions=b["positions"], segment_ids=b["segment_ids"])[0],
        b["targets"], b["weights"])[0])(host, make_batch(517))
    assert abs(float(results["fsdp=1"]["loss"]) - float(want)) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_loss_head_gives_padded_rows_no_gradient(tied):
    """The chunked loss head's own gradient (the custom VJP), tied and untied."""
    cfg = preset("tiny").replace(vocab_size=517, tie_word_embeddings=tied)

    @jax.jit
    def run(batch):
        params = init_params(cfg, jax.random.key(0), std=0.25)
        hidden = forward(params, batch["inputs"], cfg, return_hidden=True)[0]

        def loss(p, h):
            nll, count = chunked_loss_sums(p, h, batch["targets"], batch["weights"], cfg, 4)
            return nll / count
        value, (grads, _) = jax.value_and_grad(loss, argnums=(0, 1))(params, hidden)
        true_vocab = forward(params, batch["inputs"], cfg)[0]       # [B, T, 517]
        return value, grads, cross_entropy(true_vocab, batch["targets"], batch["weights"])[0]
    value, grads, want = run(make_batch(517))
    assert abs(float(value) - float(want)) < 1e-5
    head = np.asarray(grads["embed"] if tied else grads["lm_head"].T)   # [640, D]
    assert not np.any(head[517:]) and np.abs(head[:517]).max() > 1e-3


def test_plan_compiles_the_8b_decode_loop_at_tensor_16(tmp_path):
    """8 KV heads on tensor=16: the k/v weights are replicated, everything else split
    16 ways, the cache holds each KV head twice and one per device; the per-device
    arguments match that count. (Host RAM / 16 may not hold it: exit status 1.)"""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    batch, seq = 8, 512
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "plan", "--model", "meditron3-8b", "--mode",
         "infer", "--mesh", "tensor=16", "--batch", str(batch), "--seq", str(seq),
         "--target", "cpu:16", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    print("\n" + proc.stdout)
    assert "8 KV heads: k/v weights replicated, cache of 16 heads" in proc.stdout
    data = json.loads(out.read_text())
    assert data["mesh"] == "data=1,fsdp=1,tensor=16" and data["memory"]["refusal"] is None
    assert data["memory"]["fits"] == (proc.returncode == 0)
    big = preset("meditron3-8b")
    d, f, n, v = big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.vocab_size
    kv_width = big.num_key_value_heads * big.head_dim
    split = 2 * v * d + n * (2 * d * d + 3 * d * f)            # embed, head, q, o, mlp
    replicated = n * 2 * d * kv_width + (2 * n + 1) * d          # k, v, norms
    cache = 2 * n * batch * seq * big.head_dim                  # k and v: one head
    want = 2 * (split / 16 + replicated + cache)                 # bfloat16
    assert abs(data["memory"]["arguments"] - want) / want < 0.01
