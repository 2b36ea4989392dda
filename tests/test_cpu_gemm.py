"""The oneMKL matmul path (meditron_jax.cpu_gemm): products, gradients, the model and
the train step against XLA's dot, when it is chosen, and what happens when it cannot
load. The test process has 8 CPU devices, so "auto" never picks it here; the tests ask
for it explicitly (``matmul_impl="blas"`` or ``cpu_gemm.forced``), and one-device
behaviour is checked in fresh processes."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from meditron_jax import cpu_gemm
from meditron_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_mkl = pytest.mark.skipif(not cpu_gemm.available(),
                               reason=f"oneMKL path unavailable: {cpu_gemm.status()[1]}")

# (M, K, N): one tile, row tiles (M >= N), column tiles not a multiple of 16, a GEMV,
# an empty contraction.
SHAPES = [(5, 7, 3), (513, 96, 130), (37, 200, 1001), (1, 768, 2050), (6, 0, 4)]


def _operands(m, k, n, trans_a, trans_b, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    return a, b, (a.T.copy() if trans_a else a), (b.T.copy() if trans_b else b)


@needs_mkl
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_equals_float64_numpy_for_every_transpose(m, k, n):
    for trans_a in (False, True):
        for trans_b in (False, True):
            a, b, a_in, b_in = _operands(m, k, n, trans_a, trans_b)
            got = np.asarray(jax.jit(cpu_gemm.matmul, static_argnums=(2, 3))(
                a_in, b_in, trans_a, trans_b))
            want = a.astype(np.float64) @ b.astype(np.float64)
            assert got.shape == (m, n)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.sqrt(k)))


@needs_mkl
def test_matmul_gradients_equal_xla_dot_for_every_transpose():
    m, k, n = 33, 20, 47
    r = np.random.default_rng(3).standard_normal((m, n), dtype=np.float32)
    for trans_a in (False, True):
        for trans_b in (False, True):
            _, _, a_in, b_in = _operands(m, k, n, trans_a, trans_b, seed=1)

            def ours(a, b):
                return jnp.sum(jnp.tanh(cpu_gemm.matmul(a, b, trans_a, trans_b)) * r)

            def xla(a, b):
                op_a = a.T if trans_a else a
                op_b = b.T if trans_b else b
                return jnp.sum(jnp.tanh(op_a @ op_b) * r)
            got = jax.jit(jax.grad(ours, argnums=(0, 1)))(a_in, b_in)
            want = jax.grad(xla, argnums=(0, 1))(a_in, b_in)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("tied", [False, True])
def test_forward_and_decode_layout_equal_the_xla_path(tied):
    from meditron_jax.config import preset
    from meditron_jax.kvcache import KVCache
    from meditron_jax.model import decode_layout, forward, init_params

    cfg = dataclasses.replace(preset("tiny"), tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.key(0), std=0.25)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)

    def run(p, impl):
        full = jax.jit(lambda p, t: forward(p, t, cfg, matmul_impl=impl)[0])(p, tokens)
        cache = KVCache.init(cfg, 2, 16)
        _, cache = forward(p, tokens[:, :-1], cfg, cache=cache, matmul_impl=impl)
        step, _ = forward(p, tokens[:, -1:], cfg, cache=cache, matmul_impl=impl)
        return np.asarray(full), np.asarray(step)

    want_full, want_step = run(params, "xla")
    scale = np.abs(want_full).max()
    assert scale > 1.0  # std 0.25 weights: a wrong product cannot hide in the tolerance
    for p in (params, decode_layout(params)):
        full, step = run(p, "blas")
        np.testing.assert_allclose(full, want_full, rtol=0, atol=2e-5 * scale)
        np.testing.assert_allclose(step[:, 0], want_full[:, -1], rtol=0, atol=2e-5 * scale)
    # and the jitted program really calls oneMKL
    text = jax.jit(lambda p, t: forward(p, t, cfg, matmul_impl="blas")[0]).lower(
        params, tokens).as_text()
    assert cpu_gemm.TARGET in text


@needs_mkl
@pytest.mark.parametrize("tied", [False, True])
def test_training_gradients_and_step_equal_the_xla_path(tied):
    """The loss and every gradient (forward, the chunked loss with its hand-written head
    gradient, backward through every projection and attention product), and one whole
    AdamW step's metrics, are the same with oneMKL as with XLA's dot."""
    from meditron_jax.config import preset
    from meditron_jax.model import init_params
    from train.config import OptimSection
    from train.optim import make_optimizer, schedule
    from train.step import StepOptions, init_state, make_loss_sums, make_train_step

    cfg = dataclasses.replace(preset("tiny"), tie_word_embeddings=tied)
    optim = OptimSection(lr=1e-2, warmup_steps=0, decay="constant")
    optimizer = make_optimizer(optim, total_steps=1)
    opts = StepOptions(compute_dtype=jnp.float32, remat="full", loss_chunk=8)
    params = init_params(cfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
             "weights": (rng.random((2, 32)) > 0.2).astype(np.float32),
             "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (2, 32))}

    def run(impl):
        with cpu_gemm.forced(impl):
            loss = make_loss_sums(cfg, opts)
            grad = jax.jit(jax.value_and_grad(lambda p: loss(p, None, batch)[0]))
            value, grads = grad(params)
            step = jax.jit(make_train_step(cfg, optimizer, schedule(optim, 1), opts))
            _, metrics = step(init_state(params, optimizer), batch)
            text = grad.lower(params).as_text()
        assert (cpu_gemm.TARGET in text) == (impl == "blas")
        return value, grads, metrics

    want_value, want_grads, want = run("xla")
    got_value, got_grads, got = run("blas")
    np.testing.assert_allclose(float(got_value), float(want_value), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        scale = float(np.abs(np.asarray(w)).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5)


@needs_mkl
def test_flash_attention_equals_full_attention_and_differentiates_like_it():
    """The one-call causal attention (key blocks smaller than the sequence, several
    query blocks per row, packed segments, left padding, grouped heads) equals the
    full masked softmax; its gradient (the chunked oneMKL products) equals XLA's."""
    from meditron_jax.layers import attention, attention_mask, causal_attention

    b, t, n, kv, h = 3, 320, 6, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(kk, (b, t, kv, h)) for kk in keys[1:3])
    probe = jax.random.normal(keys[3], q.shape)
    seg = jnp.asarray(np.array([[1] * t, [1] * 70 + [2] * 130 + [3] * 120,
                                [0] * 45 + [1] * (t - 45)]), jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(seg, slots, seg)
    flash = jax.jit(lambda q, k, v: causal_attention(q, k, v, mask, None, 8, "blas", seg))
    assert cpu_gemm.ATTENTION_TARGET in flash.lower(q, k, v).as_text()
    want = np.asarray(attention(q, k, v, mask))
    np.testing.assert_allclose(np.asarray(flash(q, k, v)), want, rtol=0, atol=2e-6 * np.abs(want).max())

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * probe)
    got = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, mask, None, 8, "blas", seg)),
                   argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0,
                                   atol=1e-5 * np.abs(np.asarray(w)).max())


def test_resolve_choices_and_bad_values(monkeypatch):
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    assert cpu_gemm.resolve() == "xla"            # 8 devices here: never the custom call
    assert cpu_gemm.resolve("xla") == "xla"
    with cpu_gemm.forced("xla"):
        assert cpu_gemm.resolve("blas") == "xla"  # the planner's override wins
    with pytest.raises(UserError, match="matmul_impl 'mkl': choose one of auto, xla, blas"):
        cpu_gemm.resolve("mkl")
    monkeypatch.setenv(cpu_gemm.ENV, "fast")
    with pytest.raises(UserError, match="MEDITRON_MATMUL 'fast': choose one of"):
        cpu_gemm.resolve()
    monkeypatch.setenv(cpu_gemm.ENV, "xla")
    assert cpu_gemm.resolve() == "xla"
    with pytest.raises(ValueError):
        with cpu_gemm.forced("auto"):
            pass


def test_an_explicit_blas_that_cannot_load_says_why(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_state", {"error": "oneMKL is not installed (pip ...)"})
    assert cpu_gemm.status() == (None, "oneMKL is not installed (pip ...)")
    with pytest.raises(UserError, match="'blas' is unavailable: oneMKL is not installed"):
        cpu_gemm.resolve("blas")
    assert cpu_gemm.resolve("auto") == "xla"


def test_auto_uses_onemkl_only_on_one_device_of_an_intel_cpu(monkeypatch):
    assert cpu_gemm.cpu_vendor() != ""  # this Linux box names its vendor
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "available", lambda: True)
    for vendor, devices_one, want in [("GenuineIntel", True, "blas"),
                                      ("AuthenticAMD", True, "xla"),
                                      ("", True, "xla"),
                                      ("GenuineIntel", False, "xla")]:
        monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(cpu_gemm, "one_cpu_device", lambda d=devices_one: d)
        assert cpu_gemm.resolve() == want, (vendor, devices_one)
        assert cpu_gemm.resolve("auto") == want
        assert cpu_gemm.resolve("blas") == "blas"  # explicit: any vendor


def test_layers_are_unrolled_only_under_onemkl_unless_asked():
    assert cpu_gemm.scan_layers(None, "xla") is True     # XLA's GEMMs: scanned was faster
    assert cpu_gemm.scan_layers(None, "blas") is False   # around oneMKL's custom calls
    assert cpu_gemm.scan_layers(True, "blas") is True and cpu_gemm.scan_layers(False) is False
    with cpu_gemm.forced("xla"):
        assert cpu_gemm.scan_layers(False, "blas") is True  # the planner always scans


def _one_device_probe(tmp_path, **env) -> dict:
    """``resolve()`` and ``status()`` in a fresh one-CPU-device process, and whether
    "auto" would pick oneMKL on this CPU."""
    code = ("import json; from meditron_jax import cpu_gemm; "
            "print(json.dumps({'impl': cpu_gemm.resolve(), 'status': cpu_gemm.status(), "
            "'prefers': cpu_gemm.auto_prefers_blas()}))")
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                "MEDITRON_CACHE_DIR": str(tmp_path / "cache"), **env}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_mkl
def test_one_cpu_device_picks_onemkl_and_falls_back_when_it_cannot(tmp_path):
    auto = _one_device_probe(tmp_path)
    assert auto["impl"] == ("blas" if auto["prefers"] else "xla")
    assert auto["prefers"] == (cpu_gemm.cpu_vendor() == "GenuineIntel")
    assert _one_device_probe(tmp_path, MEDITRON_MATMUL="blas")["impl"] == "blas"
    assert list((tmp_path / "cache" / "kernels").glob("cpu_gemm-*.so"))  # compiled, cached
    assert _one_device_probe(tmp_path, MEDITRON_MATMUL="xla")["impl"] == "xla"
    missing = _one_device_probe(tmp_path, MEDITRON_MKL_LIB=str(tmp_path / "nope.so"))
    assert missing["impl"] == "xla"
    assert missing["status"] == [None, "oneMKL is not installed (pip install "
                                       "'meditron-jax[cpu]')"]
    broken = _one_device_probe(tmp_path / "other", CXX="false")
    assert broken["impl"] == "xla" and "compiling cpu_gemm.cc failed" in broken["status"][1]
