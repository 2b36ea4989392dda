"""Tier 2: parity with transformers' PyTorch LlamaForCausalLM on the same random weights.

Weights are N(0, 0.25) so the tests can fail: ``test_wrong_variants_fail`` shows that a
model with rope scaling ignored, eps 1e-6 or theta 10000 lands far outside tolerance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.model.config import LlamaConfig, RopeScaling
from meditron_jax.errors import UserError
from meditron_jax.io.hf_keys import params_from_hf
from meditron_jax.model import unstack_layers, cross_entropy, forward
from tests.hf_fixtures import make_hf_model, state_dict_numpy, torch_logits

TOL = 1e-4
SEQ = 48  # past original_max_position_embeddings=16 of the tiny llama3 config


def _setup(**overrides):
    model = make_hf_model(**overrides)
    cfg = LlamaConfig.from_hf(model.config.to_dict())
    params = jax.tree.map(jnp.asarray, params_from_hf(state_dict_numpy(model), cfg))
    return model, cfg, params


def _tokens(batch, seq, vocab=256, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


_fwd = jax.jit(forward, static_argnames=("cfg", "dtype", "remat"))


@pytest.fixture(scope="module")
def llama3_kv2():
    return _setup()


ROPE = {
    "llama3": None,  # the fixture default
    "linear": {"rope_type": "linear", "factor": 4.0},
    "none": None,
}


@pytest.mark.parametrize("rope,kv_heads", [
    ("llama3", 4), ("llama3", 2), ("llama3", 1), ("linear", 2), ("none", 2)])
def test_logits_match_transformers(rope, kv_heads):
    overrides = {"num_key_value_heads": kv_heads}
    if rope == "linear":
        overrides["rope_scaling"] = ROPE["linear"]
    elif rope == "none":
        overrides["rope_scaling"] = None
        overrides["rope_theta"] = 10000.0
    model, cfg, params = _setup(**overrides)
    expected_type = {"llama3": "llama3", "linear": "linear", "none": "default"}[rope]
    assert cfg.rope_scaling.rope_type == expected_type
    tokens = _tokens(2, SEQ)
    ours = np.asarray(_fwd(params, tokens, cfg)[0])
    ref = torch_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # logits large enough that errors would show
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_wrong_variants_fail(llama3_kv2):
    """The parity test above can fail: each plausible mistake moves logits by >> TOL."""
    model, cfg, params = llama3_kv2
    tokens = _tokens(2, SEQ)
    ref = torch_logits(model, tokens)
    good = np.abs(np.asarray(_fwd(params, tokens, cfg)[0]) - ref).max()
    assert good < TOL
    wrong = {
        "rope scaling ignored": cfg.replace(rope_scaling=RopeScaling()),
        "eps 1e-6": cfg.replace(rms_norm_eps=1e-6),
        "theta 10000": cfg.replace(rope_theta=10000.0),
    }
    errors = {name: float(np.abs(np.asarray(_fwd(params, tokens, c)[0]) - ref).max())
              for name, c in wrong.items()}
    print("max-abs logit error of wrong variants:", errors, "correct:", good)
    for name, err in errors.items():
        assert err > 100 * TOL, f"{name} is indistinguishable from the right model ({err})"


def test_left_padded_batch_equals_each_row_alone(llama3_kv2):
    model, cfg, params = llama3_kv2
    lengths = [SEQ, 30, 11]
    seqs = [_tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    tokens = np.zeros((3, SEQ), np.int32)
    segments = np.zeros((3, SEQ), np.int32)
    positions = np.zeros((3, SEQ), np.int32)
    for row, s in enumerate(seqs):
        pad = SEQ - len(s)
        tokens[row, pad:] = s
        segments[row, pad:] = 1
        positions[row, pad:] = np.arange(len(s))
    ours = np.asarray(_fwd(params, tokens, cfg, positions=positions, segment_ids=segments)[0])
    # transformers' own left-padded batch (attention mask + position ids) ...
    ref_batch = torch_logits(model, tokens, attention_mask=segments,
                             position_ids=positions)
    for row, s in enumerate(seqs):
        pad = SEQ - len(s)
        alone = torch_logits(model, s[None])[0]
        np.testing.assert_allclose(ours[row, pad:], alone, atol=TOL, rtol=0)
        np.testing.assert_allclose(ours[row, pad:], ref_batch[row, pad:], atol=TOL, rtol=0)


def test_packed_rows_equal_documents_alone(llama3_kv2):
    model, cfg, params = llama3_kv2
    docs = [_tokens(1, n, seed=10 + i)[0] for i, n in enumerate([20, 17, 7])]
    tokens = np.concatenate(docs + [np.zeros(4, np.int32)])[None]
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)]
                              + [np.zeros(4)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(4)])[None]
    ours = np.asarray(_fwd(params, tokens, cfg, positions=positions.astype(np.int32),
                           segment_ids=segments)[0])[0]
    start = 0
    for d in docs:
        alone = torch_logits(model, d[None])[0]
        np.testing.assert_allclose(ours[start:start + len(d)], alone, atol=TOL, rtol=0)
        start += len(d)


def test_loss_and_gradients_match_torch(llama3_kv2):
    import torch
    model, cfg, params = llama3_kv2
    tokens = _tokens(2, 24, seed=3)

    def loss_fn(p):
        logits, _ = forward(p, tokens[:, :-1], cfg)
        return cross_entropy(logits, jnp.asarray(tokens[:, 1:]))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    model.zero_grad()
    t_tokens = torch.as_tensor(tokens, dtype=torch.long)
    out = model(t_tokens, labels=t_tokens)
    out.loss.backward()
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), rtol=1e-4)
    t_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    ref = params_from_hf(t_grads, cfg)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        r = ref
        for k in path:
            r = r[k.key]
        scale = np.abs(r).max()
        err = np.abs(np.asarray(g) - r).max() / scale
        assert err < 1e-4, f"gradient {jax.tree_util.keystr(path)}: relative error {err}"


@pytest.mark.parametrize("remat", ["full", "dots", "save_qkv_proj"])
def test_remat_and_per_layer_weights_change_nothing(llama3_kv2, remat):
    """Remat policies, and the layers run unrolled over per-layer weights instead of
    scanned, give the same loss and gradients."""
    _, cfg, params = llama3_kv2
    tokens = _tokens(2, 16, seed=4)

    def loss(p, remat):
        logits, _ = forward(p, tokens, cfg, remat=remat)
        return cross_entropy(logits[:, :-1], jnp.asarray(tokens[:, 1:]))[0]

    def restack(g):  # per-layer gradients back to the stacked layout
        return {**g, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *g["layers"])}

    base, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=(1,))(params, "none")
    other, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=(1,))(
        unstack_layers(params), remat)
    g1 = restack(g1)
    np.testing.assert_allclose(float(other), float(base), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(a).max())


def test_bf16_compute_stays_close_and_returns_f32_logits(llama3_kv2):
    _, cfg, params = llama3_kv2
    tokens = _tokens(1, 16, seed=5)
    f32 = np.asarray(_fwd(params, tokens, cfg)[0])
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits = _fwd(bf16_params, tokens, cfg, dtype=jnp.bfloat16)[0]
    assert logits.dtype == jnp.float32
    # bf16 has ~3 significant digits; with std-0.25 weights logits are O(10).
    rel = np.abs(np.asarray(logits) - f32).max() / np.abs(f32).max()
    assert rel < 0.1
    assert (np.asarray(logits).argmax(-1) == f32.argmax(-1)).mean() > 0.8


def test_bad_tokens_and_lengths_are_one_line_errors(llama3_kv2):
    _, cfg, params = llama3_kv2
    with pytest.raises(UserError, match="outside the vocabulary"):
        forward(params, np.array([[1, 2, cfg.vocab_size]]), cfg)
    with pytest.raises(UserError, match="outside the vocabulary"):
        forward(params, np.array([[-1, 2]]), cfg)
    with pytest.raises(UserError, match="max_position_embeddings"):
        forward(params, np.zeros((1, cfg.max_position_embeddings + 1), np.int32), cfg)
