"""``meditron-jax plan``: ahead-of-time memory and FLOPs of the real steps, abstract
inputs only. The full 8B train step is planned on cpu:8 (the TPU targets are in
tests/test_plan_tpu.py; their numbers for every target are in bench/PLAN.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cli.plan import make_plan
from cli.main import main
from meditron_jax.model.config import preset
from meditron_jax.model import abstract_params, forward
from sharding.aot import refusal_sizes, step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = preset("meditron3-8b")
TINY = preset("tiny")


def test_full_8b_train_step_on_cpu8():
    plan = make_plan(BIG, model="meditron3-8b", mode="train", target="cpu:8", mesh="fsdp=8",
                     batch=8, seq=2048, remat="full")
    print("\n" + plan.format())
    n = BIG.num_params()
    state = 12 * n / 8  # float32 params + Adam mu and nu, split 8 ways
    assert abs(plan.memory.arguments - state) / state < 0.01
    assert plan.memory.aliased > 0.99 * state  # the state is donated: updated in place
    # full remat recomputes the forward in the backward: ~8N FLOPs per token vs 6N
    assert 1.2 < plan.flops / plan.model_flops < 1.45
    assert plan.memory.refusal is None and plan.mesh == "data=1,fsdp=8,tensor=1"


def test_flops_count_every_layer_of_the_scan():
    # wide enough that matmuls dominate the elementwise work XLA also counts
    cfg = TINY.replace(hidden_size=256, intermediate_size=512, vocab_size=1024,
                       num_hidden_layers=4)
    fn = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    args = (abstract_params(cfg), jax.ShapeDtypeStruct((2, 64), jnp.int32))
    analytic = 2 * 64 * cfg.flops_per_token(64, training=False)
    counted = step_flops(fn, args)
    naive = fn.lower(*args).cost_analysis()["flops"]  # the scanned body counted once
    assert abs(counted / analytic - 1) < 0.03
    assert naive < 0.5 * counted


def test_decode_plan_counts_one_step_per_token():
    plan = make_plan(TINY, model="tiny", mode="infer", target="cpu:8", mesh="data=4,tensor=2",
                     batch=8, seq=64)
    # one token per row against the whole 64-slot cache (masked slots are still computed)
    analytic = 8 * TINY.flops_per_token(2 * 64, training=False)
    assert 0.9 < plan.flops / analytic < 1.3
    assert plan.memory.fits and plan.memory.arguments > 0


def test_cli_writes_the_plan(tmp_path):
    """As a user runs it: a fresh process with neither JAX_PLATFORMS nor XLA_FLAGS (plan
    makes its own 8 CPU devices) and, with libtpu installed, no TPU start-up noise."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "plan", "--model", "tiny", "--target", "cpu:8",
         "--mesh", "data=2,fsdp=4", "--batch", "8", "--seq", "64", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tiny train step on cpu:8" in proc.stdout and "fits" in proc.stdout
    assert "TPU" not in proc.stderr, proc.stderr
    data = json.loads(out.read_text())
    assert data["memory"]["fits"] is True and data["flops"] > 0
    assert data["mesh"] == "data=2,fsdp=4,tensor=1"


@pytest.mark.parametrize("args, message", [
    (["--target", "tpu:v9:2x2"], "unknown TPU generation 'v9'"),
    (["--target", "tpu:v5p:2x2"], "a v5p topology has 3 dimensions"),
    (["--target", "gpu:8"], "expected cpu:N or tpu:GEN:TOPOLOGY"),
    (["--target", "tpu:v5e:2x4:0"], "slice count must be a positive integer"),
    (["--target", "cpu:64"], "this process has 8 CPU device"),
    (["--mesh", "tensor=3"], "32 query heads are not divisible by tensor=3"),
    (["--mesh", "fsdp=8", "--batch", "6"], "batch size 6 is not divisible"),
    (["--seq", "200000"], "exceeds the model's max_position_embeddings"),
    (["--model", "no-such-model"], "neither a preset"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert main(["plan"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_refusal_sizes_reads_the_compilers_figures():
    message = ("Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(38.24G) exceeds available HBM (31.25G).")
    assert refusal_sizes(message) == [38.24 * 2 ** 30, 31.25 * 2 ** 30]
