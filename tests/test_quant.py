"""Int8 weight-only inference wired through loading, placement, the commands and training.

Quantized loads on a mesh (data=2,tensor=2; tensor=4 with one KV head, k/v replicated)
give the single-device quantized logits (1e-5) and the shardings ``param_shardings``
names; ``generate``/``score``/``eval`` with ``--quantize int8`` run and agree with the
unquantized run (greedy tokens, scores, predictions: numbers asserted); bad schemes,
int8 training and ``plan --mode train --quantize`` are one-line errors; a sweep resumed
under another ``--quantize`` is refused; ``log.eval_quantize: int8`` logs the held-out
loss of int8 copies beside the float one; ``plan --quantize int8`` plans less memory.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

import sharding
from cli import main as cli
from infer.engine import Generator
from infer.sweep import SETTINGS_SUFFIX
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from meditron_jax.model import forward
from meditron_jax.model.quant import is_quantized, weight_bytes
from tests import hf_fixtures

MODELS = {"v517": dict(vocab_size=517), "mqa": dict(vocab_size=300, num_key_value_heads=1)}
MESHES = [("v517", "data=2,tensor=2"), ("mqa", "tensor=4")]
PROMPTS = [{"id": f"p{i}", "prompt_ids": [1] + [(13 * i + 7 * j) % 250 + 3 for j in range(4 + i)]}
           for i in range(8)]
REQUESTS = [{"id": f"r{i}", "context_ids": [1, 7 + i, 9, 30 + 2 * i],
             "continuation_ids": [20 + i, 4, 50 + i]} for i in range(8)]
NEW = 12


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    out = {}
    for name, overrides in MODELS.items():
        path = tmp_path_factory.mktemp(f"q_{name}")
        out[name] = hf_fixtures.make_hf_snapshot(path, **overrides)
    return out


@functools.lru_cache(maxsize=None)
def _mesh(spec):
    return sharding.make_mesh(spec)


def _load(path, spec=None, quantize="int8"):
    mesh = _mesh(spec) if spec else None
    fn = None if mesh is None else (
        lambda cfg, q=None: sharding.param_shardings(cfg, mesh, sharding.INFER_RULES, q))
    return load_model(path, shardings=fn, quantize=quantize)


# ---- loading and placement -------------------------------------------------------------------
@pytest.mark.parametrize("name, spec", MESHES)
def test_quantized_load_on_a_mesh_matches_one_device(snapshots, name, spec):
    single, sharded = _load(snapshots[name]), _load(snapshots[name], spec)
    cfg, mesh = single.cfg, _mesh(spec)
    assert sharded.quantize == "int8" and is_quantized(sharded.params["layers"]["q"])
    assert sharded.params["layers"]["down"].qvalue.dtype == np.int8
    assert sharded.params["layers"]["down"].scale.dtype == np.float32
    # every array where param_shardings(quantize="int8") puts it
    expected = sharding.param_shardings(cfg, mesh, sharding.INFER_RULES, "int8")
    got = jax.tree.map(lambda x: x.sharding, sharded.params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert g.is_equivalent_to(e, 4), (g, e)
    q = sharded.params["layers"]["q"]
    assert q.qvalue.sharding.spec[2] == "tensor" and all(a is None for a in q.scale.sharding.spec[:2])
    if cfg.num_key_value_heads % mesh.shape["tensor"]:   # one KV head on tensor=4: replicated
        assert sharded.params["layers"]["k"].qvalue.sharding.is_fully_replicated
    # int8 values + float32 scales: about a quarter of the float32 layers' bytes
    full = load_model(snapshots[name])
    ratio = weight_bytes(single.params["layers"]) / weight_bytes(full.params["layers"])
    assert 0.25 < ratio < 0.3, ratio
    tokens = np.array([[1, 5, 9, 33, 7, 100, 4, 8], [1, 3, 3, 3, 3, 2, 9, 11]], np.int32)
    a = np.asarray(forward(single.params, tokens, cfg)[0], np.float32)
    b = np.asarray(jax.jit(lambda p, t: forward(p, t, cfg)[0])(sharded.params, tokens),
                   np.float32)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    # the runner places the quantized tree (Placement.params) and decodes the same tokens
    prompts = [p["prompt_ids"] for p in PROMPTS[:4]]
    one = Generator(single, batch_size=4).generate(prompts, max_new_tokens=8)
    many = Generator(sharded, mesh, batch_size=4).generate(prompts, max_new_tokens=8)
    assert [c.ids for c in many] == [c.ids for c in one]


def test_quantized_load_frees_the_float_weights(snapshots):
    mesh = _mesh("data=2,tensor=2")
    loaded = load_model(snapshots["v517"],
                        shardings=lambda cfg: sharding.param_shardings(cfg, mesh,
                                                                       sharding.INFER_RULES))
    from meditron_jax.io.loading import quantize_loaded
    before = jax.tree.leaves(loaded.params)
    quantize_loaded(loaded.params, "int8")
    assert all(x.is_deleted() for x in before)


# ---- the commands ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweeps(tiny_hf_dir, tmp_path_factory):
    """generate and score sweeps of the shared tiny model with and without int8."""
    tmp = tmp_path_factory.mktemp("qsweeps")
    src, req = _write(tmp / "prompts.jsonl", PROMPTS), _write(tmp / "requests.jsonl", REQUESTS)
    runs = {}
    for label, extra in (("fp", []), ("int8", ["--quantize", "int8"])):
        gen, score = tmp / f"gen_{label}.jsonl", tmp / f"score_{label}.jsonl"
        assert cli.main(["generate", "--model", tiny_hf_dir, "--prompts", src, "--out", str(gen),
                         "--max-new-tokens", str(NEW), "--batch-size", "4", *extra]) == 0
        assert cli.main(["score", "--model", tiny_hf_dir, "--input", req, "--out", str(score),
                         "--batch-size", "4", *extra]) == 0
        runs[label] = (gen, score)
    return src, req, runs


def test_generate_int8_agrees_with_float(sweeps, tiny_hf_dir):
    _, _, runs = sweeps
    fp = {r["id"]: r["completion_ids"] for r in _read(runs["fp"][0])}
    q = {r["id"]: r["completion_ids"] for r in _read(runs["int8"][0])}
    assert fp.keys() == q.keys() and len(fp) == len(PROMPTS)
    # free-running greedy: rows part at their first flip (then differ by construction);
    # measured here 66/96 equal tokens, first flip at 8.25 of 12 on average
    same = sum(a == b for k in fp for a, b in zip(fp[k], q[k]))
    first = [next((i for i, (a, b) in enumerate(zip(fp[k], q[k])) if a != b), NEW) for k in fp]
    assert same >= 0.6 * NEW * len(fp) and np.mean(first) >= 6, (same, first)
    # teacher-forced on the float completions: the greedy token agrees at >= 85% of
    # positions (measured 144/164 = 0.878: this std-0.25 fixture amplifies the 0.6%
    # relative weight error of int8 into logit differences up to 0.6 against top-2
    # margins of 0.4 median; the accuracy bound on scaled models is test_quant_accuracy's)
    models = {k: load_model(tiny_hf_dir, quantize=k) for k in (None, "int8")}
    agree = total = 0
    for p in PROMPTS:
        tokens = np.array([p["prompt_ids"] + fp[p["id"]]], np.int32)
        a, b = (np.asarray(forward(m.params, tokens, m.cfg)[0]).argmax(-1)
                for m in models.values())
        agree, total = agree + int((a == b).sum()), total + a.size
    assert agree >= 0.85 * total, (agree, total)
    assert json.load(open(f"{runs['int8'][0]}{SETTINGS_SUFFIX}"))["quantize"] == "int8"
    assert "quantize" not in json.load(open(f"{runs['fp'][0]}{SETTINGS_SUFFIX}"))


def test_score_int8_close_to_float(sweeps):
    _, _, runs = sweeps
    fp = {r["id"]: r for r in _read(runs["fp"][1])}
    q = {r["id"]: r for r in _read(runs["int8"][1])}
    diffs = [abs(fp[k]["logprob"] - q[k]["logprob"]) for k in fp]
    scale = np.mean([abs(fp[k]["logprob"]) for k in fp])
    assert max(diffs) < 0.05 * scale and max(diffs) > 0, (diffs, scale)   # changed, slightly


def test_sweep_resumed_under_another_quantize_is_refused(sweeps, tiny_hf_dir, tmp_path, capsys):
    src, req, runs = sweeps
    for kind, i, argv in (("generate", 0, ["--prompts", src, "--max-new-tokens", str(NEW)]),
                          ("score", 1, ["--input", req])):
        for done, extra in (("fp", ["--quantize", "int8"]), ("int8", [])):
            out = tmp_path / f"{kind}_{done}.jsonl"
            ref = runs[done][i]
            out.write_bytes(b"".join(open(ref, "rb").readlines()[:3]))
            settings = open(f"{ref}{SETTINGS_SUFFIX}", "rb").read()
            open(f"{out}{SETTINGS_SUFFIX}", "wb").write(settings)
            assert cli.main([kind, "--model", tiny_hf_dir, *argv, "--out", str(out),
                             "--batch-size", "4", *extra]) == 2
            assert "quantize" in _error(capsys)
            assert open(f"{out}{SETTINGS_SUFFIX}", "rb").read() == settings   # untouched
            assert len(open(out).readlines()) == 3


def test_eval_int8_beside_float(tmp_path):
    from tests.eval_fixtures import make_eval_snapshot, sample
    snap = make_eval_snapshot(tmp_path / "tiny")
    rows = {}
    for label, extra in (("fp", []), ("int8", ["--quantize", "int8"])):
        out = tmp_path / label
        assert cli.main(["eval", "--model", snap, "--task", "medqa", "--data", sample("medqa"),
                         "--limit", "12", "--out", str(out), *extra]) == 0
        rows[label] = _read(out / "tiny" / "medqa" / "items.jsonl")
        summary = json.loads((out / "tiny" / "medqa" / "summary.json").read_text())
        assert summary.get("quantize") == (None if label == "fp" else "int8")
    fp, q = rows["fp"], rows["int8"]
    assert len(fp) == len(q) == 12
    agree = sum(a["pred"] == b["pred"] for a, b in zip(fp, q))
    assert agree >= 10, agree
    lls = np.abs(np.array([a["loglikelihoods"] for a in fp]) -
                 np.array([b["loglikelihoods"] for b in q]))
    assert 0 < lls.max() < 0.05 * np.abs(np.array([a["loglikelihoods"] for a in fp])).mean()
    # a resume under the other setting is refused (eval's settings.json)
    assert cli.main(["eval", "--model", snap, "--task", "medqa", "--data", sample("medqa"),
                     "--limit", "12", "--out", str(tmp_path / "fp"), "--quantize", "int8"]) == 2


# ---- one-line errors -------------------------------------------------------------------------
def test_bad_scheme_is_one_line(tiny_hf_dir, tmp_path, capsys):
    req = _write(tmp_path / "r.jsonl", REQUESTS[:1])
    for argv in (["generate", "--model", tiny_hf_dir, "--prompt", "x"],
                 ["score", "--model", tiny_hf_dir, "--input", req, "--out",
                  str(tmp_path / "o.jsonl")],
                 ["eval", "--model", tiny_hf_dir, "--task", "medqa", "--data", req],
                 ["plan", "--model", "tiny", "--mode", "infer"]):
        assert cli.main(argv + ["--quantize", "int4"]) == 2
        assert "--quantize 'int4' is not supported; choose one of int8" in _error(capsys)
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_int8_training_is_refused(tmp_path, capsys):
    from tests.train_support import tiny_run
    with pytest.raises(UserError, match="int8 weights are inference-only") as exc:
        tiny_run(tmp_path, model={"quantize": "int8"})
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="log.eval_quantize must be one of int8"):
        tiny_run(tmp_path, data={"eval_file": "x"}, log={"eval_every": 5, "eval_quantize": "int4"})
    with pytest.raises(UserError, match="under LoRA"):
        tiny_run(tmp_path, data={"eval_file": "x"}, log={"eval_every": 5, "eval_quantize": "int8"},
                 lora={"rank": 4})
    assert cli.main(["plan", "--model", "tiny", "--mode", "train", "--quantize", "int8"]) == 2
    assert "int8 weights are inference-only; plan it with --mode infer" in _error(capsys)


def test_training_logs_the_int8_eval_loss(tmp_path):
    from train.loop import run_training
    from train.metrics import read_metrics
    from tests.train_support import CORPUS, tiny_run
    held_out = tmp_path / "heldout.txt"
    held_out.write_text(open(CORPUS).read()[:4000])
    run = tiny_run(tmp_path / "run", data={"eval_file": str(held_out)},
                   train={"steps": 6, "grad_accum": 1, "mesh": "data=2,tensor=2"},
                   checkpoint={"every": 6},
                   log={"eval_every": 3, "eval_batches": 1, "eval_quantize": "int8"})
    summary = run_training(run)
    rows = [r for r in read_metrics(summary["metrics"]) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:   # int8 copies of the same weights: a nearby, not identical, loss
        assert r["eval_loss_int8"] != r["eval_loss"]
        assert abs(r["eval_loss_int8"] - r["eval_loss"]) < 0.02 * r["eval_loss"], r
    assert summary["final_eval_loss_int8"] == rows[-1]["eval_loss_int8"]


def test_plan_infer_int8_needs_less_memory(tmp_path):
    from cli.plan import make_plan
    from meditron_jax.model.config import preset
    cfg = preset("tiny")
    plans = {q: make_plan(cfg, model="tiny", mode="infer", target="cpu:8", mesh="tensor=2",
                          batch=2, seq=64, quantize=q) for q in (None, "int8")}
    fp, q = plans[None].memory, plans["int8"].memory
    assert "weights int8" in plans["int8"].settings
    # the weights are the arguments beside the cache; int8 projections shrink them
    assert q.arguments < fp.arguments
