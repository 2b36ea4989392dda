"""Preference training runs: sharded DPO that resumes exactly after a preemption, metrics
in JSONL and TensorBoard, and LoRA's reference (the base with the adapters off)."""
from __future__ import annotations

import glob
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.model import forward, init_params
from meditron_jax.model.config import preset
from meditron_jax.model.lora import LoraConfig, init_lora, merge
from tests.train_support import QA, compilation_cache, tiny_run
from train import checkpoints
from train.loop import run_training
from train.objectives import batch_norms, make_pair_loss
from train.metrics import read_metrics
from train.step import StepOptions, abstract_state, reference_dtype

STEPS = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
        yield path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    qa = [json.loads(line) for line in open(QA, encoding="utf-8") if line.strip()][:40]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(qa):
            f.write(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                "rejected": qa[(i + 7) % len(qa)]["completion"]}) + "\n")
    return str(path)


def dpo_run(out, pairs, **log):
    return tiny_run(out, data={"kind": "preference", "train_files": [pairs], "seq_len": 48},
                    train={"steps": STEPS, "batch_size": 8, "grad_accum": 2},
                    checkpoint={"every": 3, "keep": 2},
                    log={"cpu_peak_flops": 1e10, **log})


def records(summary):
    return {r["step"]: r for r in read_metrics(summary["metrics"]) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache, pairs):
    out = tmp_path_factory.mktemp("dpo_reference")
    summary = run_training(dpo_run(out, pairs, tensorboard=True))
    return summary, records(summary)


def test_dpo_run_metrics(reference):
    """Sharded data=2,fsdp=2,tensor=2 with grad_accum=2: the first step's policy is the
    reference (loss log 2, rewards 0); every step logs rewards, margin and accuracy to
    metrics.jsonl and TensorBoard."""
    summary, recs = reference
    assert sorted(recs) == list(range(1, STEPS + 1)) and summary["model"]
    first = recs[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_chosen"] == first["reward_rejected"] == first["reward_margin"] == 0
    for r in recs.values():
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"],
                                                   abs=1e-5)
        assert 0 <= r["reward_accuracy"] <= 1 and r["logp_chosen"] < 0
    assert any(r["reward_margin"] != 0 for r in recs.values())
    events = b"".join(open(p, "rb").read() for p in glob.glob(f"{summary['tensorboard']}/*"))
    for tag in (b"train/reward_margin", b"train/reward_accuracy", b"train/reward_chosen"):
        assert tag in events
    assert "reward_margin" in summary and "reward_accuracy" in summary


def test_dpo_resumes_exactly_after_a_preemption(reference, tmp_path, pairs, monkeypatch):
    """A preemption notice at step 3 saves and stops; the rerun restores the policy, the
    optimizer, the data position and rebuilds the frozen reference: every later step's
    loss and rewards equal the uninterrupted run's."""
    _, want = reference
    monkeypatch.setattr(checkpoints.Preemption, "reached", lambda self, step: step == 3)
    first = run_training(dpo_run(tmp_path, pairs))
    assert first["preempted"] and first["latest_checkpoint"] == 3
    monkeypatch.undo()
    second = run_training(dpo_run(tmp_path, pairs))
    assert second["start_step"] == 3 and second["steps"] == STEPS
    got = records(second)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "reward_margin", "reward_accuracy", "logp_chosen"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), \
                (step, key)


def test_lora_reference_is_the_base_with_adapters_off():
    """Under LoRA the state holds no reference copy; the rewards are beta times the
    log-ratio of the merged weights over the base, and only adapters get gradients."""
    from train.optim import make_optimizer
    from train.config import OptimSection
    cfg = preset("tiny").replace(vocab_size=128)
    lcfg = LoraConfig(4, 8.0, ("q", "v"))
    assert reference_dtype("dpo", lcfg, jnp.float32) is None
    state = abstract_state(cfg, make_optimizer(OptimSection(), 10), jnp.float32, lcfg,
                           reference_dtype("dpo", lcfg, jnp.float32))
    assert jax.tree.structure(state.frozen) == jax.tree.structure(
        jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    full = abstract_state(cfg, make_optimizer(OptimSection(), 10), jnp.float32, None,
                          reference_dtype("dpo", None, jnp.bfloat16))
    assert jax.tree.leaves(full.frozen)[0].dtype == jnp.bfloat16  # full FT: a bf16 copy

    base = init_params(cfg, jax.random.key(0), std=0.1)
    adapters = init_lora(cfg, lcfg, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # b != 0: policy != base
    rng = np.random.default_rng(0)
    rows = rng.integers(3, 128, (2, 2, 12)).astype(np.int32)
    weights = np.zeros((2, 2, 12), np.float32)
    weights[:, :, 5:] = 1
    batch = {"inputs": rows, "targets": np.roll(rows, -1, -1), "weights": weights,
             "segment_ids": np.ones_like(rows),
             "positions": np.broadcast_to(np.arange(12, dtype=np.int32), rows.shape).copy()}
    batch = jax.tree.map(jnp.asarray, batch)
    opts = StepOptions(compute_dtype=jnp.float32, remat="none", lora=lcfg, objective="dpo",
                       beta=0.5)
    fn = make_pair_loss(cfg, opts)
    (loss, (sums, _)), grads = jax.jit(jax.value_and_grad(
        lambda a: fn(a, base, batch, batch_norms(batch)), has_aux=True))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)

    @jax.jit
    def seq_logps(params):
        flat = {k: v.reshape(4, 12) for k, v in batch.items()}
        logits, _ = forward(params, flat["inputs"], cfg)
        lp = jax.nn.log_softmax(logits, -1)
        picked = jnp.take_along_axis(lp, flat["targets"][..., None], -1)[..., 0]
        return jnp.sum(picked * flat["weights"], -1).reshape(2, 2)
    ratio = seq_logps(merge(base, adapters, lcfg.scale)) - seq_logps(base)
    want_chosen = float(jnp.mean(0.5 * ratio[:, 0]))
    assert abs(want_chosen) > 1e-3
    np.testing.assert_allclose(float(sums["reward_chosen"]) / 2, want_chosen, rtol=1e-4)
    delta = ratio[:, 0] - ratio[:, 1]
    np.testing.assert_allclose(float(loss), float(jnp.mean(-jax.nn.log_sigmoid(0.5 * delta))),
                               rtol=1e-5)


def test_abstract_dpo_step_for_plan():
    """What ``plan --mode dpo`` compiles: pair batches [B, 2, T], the policy and its
    AdamW state, and the frozen reference in the compute dtype, sharded like the params."""
    from meditron_jax.model.config import preset as model_preset
    from sharding import TRAIN_RULES, make_mesh
    from train.step import abstract_train_step
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    fn, (state, batch) = abstract_train_step(model_preset("tiny"), mesh, TRAIN_RULES, batch=8,
                                             seq=32, grad_accum=2, objective="dpo")
    assert batch["inputs"].shape == (8, 2, 32)
    q, ref_q = state.params["layers"]["q"], state.frozen["layers"]["q"]
    assert q.dtype == jnp.float32 and ref_q.dtype == jnp.bfloat16
    assert ref_q.sharding == q.sharding and ref_q.shape == q.shape
    assert fn.lower(state, batch).as_text().count("stablehlo.while") >= 2
    _, (orpo_state, _) = abstract_train_step(model_preset("tiny"), mesh, TRAIN_RULES, batch=8,
                                             seq=32, objective="orpo")
    assert orpo_state.frozen is None  # ORPO needs no reference


def test_plan_help_offers_dpo(capsys):
    from cli.main import main
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "dpo: one DPO step" in capsys.readouterr().out
