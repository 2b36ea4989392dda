"""A Llama-2-family checkpoint through convert -> generate -> score -> train -> export
(issue 16, item 5), each stage the CLI command a user runs, each checked against
transformers.

The snapshot has Meditron-7B's shape, shrunk: its published config.json
(tests/data/hf_configs/meditron-7b.json: MHA, rope theta 1e4, no rope scaling, eps 1e-5)
with 4 heads / 4 KV heads of 16, 2 layers; a sentencepiece ``tokenizer.model`` (BPE with
byte fallback, trained here on the bundled corpus with Llama-2's normalizer settings)
plus 17 added tokens, as Meditron-7B's 32000 + 17 = 32017; so the vocabulary is
1000 + 17 = 1017, like 32017 not a multiple of 128 (our layout pads it to 1024) and odd
(no tensor axis divides it).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cli import main as cli
from meditron_jax.jsonl import read_jsonl
from meditron_jax.io.loading import load_model
from meditron_jax.model import forward
from meditron_jax.tokenizer import Tokenizer
from tests import hf_fixtures

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "..", "meditron_jax", "data")
PIECES = 1000
ADDED = ["<|im_start|>", "<|im_end|>"] + [f"<extra_id_{i}>" for i in range(15)]
VOCAB = PIECES + len(ADDED)
SIZES = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=VOCAB)
TEXTS = [
    "Severe malaria: give artesunate 2.4 mg/kg IV at 0, 12 and 24 hours, then once daily.",
    "A child with cholera and some dehydration needs 75 mL/kg of ORS over 4 hours.",
    "MUAC below 115 mm or bilateral pitting oedema means severe acute malnutrition.",
    "Neonatal sepsis: ampicillin plus gentamicin; keep the baby warm (skin-to-skin).",
    "<|im_start|>user\nWhat is the first-line treatment for TB?<|im_end|>\n<|im_start|>assistant\n",
]


def _token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def build_snapshot(path) -> torch.nn.Module:
    """Write the shrunk Meditron-7B-shaped snapshot at ``path``; return its model."""
    import sentencepiece as spm
    from transformers import LlamaConfig
    path = os.fspath(path)
    with open(os.path.join(HERE, "data", "hf_configs", "meditron-7b.json"), encoding="utf-8") as f:
        published = dict(json.load(f), **SIZES)
    model = hf_fixtures.model_from_config(LlamaConfig(**published), seed=7)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(published, f, indent=2)  # as published, not as transformers 5 re-spells it
    prefix = os.path.join(path, "sp")
    spm.SentencePieceTrainer.train(  # Llama-2's trainer settings
        input=os.path.join(DATA, "clinical_corpus.txt"), model_prefix=prefix, vocab_size=PIECES,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2)
    os.replace(prefix + ".model", os.path.join(path, "tokenizer.model"))
    os.remove(prefix + ".vocab")
    specials = {0: "<unk>", 1: "<s>", 2: "</s>", **{PIECES + i: t for i, t in enumerate(ADDED)}}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {str(i): _token(t) for i, t in specials.items()}}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    return model


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """(model, HF snapshot, its native conversion by ``meditron-jax convert``)."""
    root = tmp_path_factory.mktemp("llama2")
    model = build_snapshot(root / "hf")
    native = str(root / "native")
    assert cli.main(["convert", "--model", str(root / "hf"), "--out", native, "--quiet"]) == 0
    return model, str(root / "hf"), native


@pytest.fixture(scope="module")
def hf_tokenizer(llama2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(llama2[1])


def _jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _by_id(path) -> dict:
    return {row["id"]: row for _, row in read_jsonl(path)}


def _max_logit_diff(params, cfg, hf_model, tokens) -> float:
    ours = np.asarray(forward(params, np.asarray(tokens), cfg)[0])
    return float(np.abs(ours - hf_fixtures.torch_logits(hf_model, tokens)).max())


def test_tokenizer_encodes_like_transformers(llama2, hf_tokenizer):
    ours = Tokenizer.from_dir(llama2[2])  # the converted checkpoint carries the tokenizer
    assert type(hf_tokenizer).__name__ == "LlamaTokenizer" and ours.kind == "sentencepiece"
    assert ours.vocab_size == len(hf_tokenizer) == VOCAB
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        bare = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_bos=False) == bare
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    chat = ours.encode(TEXTS[-1])
    assert chat[:2] == [1, PIECES] and chat.count(PIECES + 1) == 1  # added tokens as one id each


def test_converted_checkpoint_matches_transformers(llama2):
    model, hf_dir, native = llama2
    loaded = load_model(native)
    cfg, embed = loaded.cfg, np.asarray(loaded.params["embed"])
    assert (cfg.vocab_size, cfg.num_key_value_heads, cfg.rope_theta) == (VOCAB, 4, 10000.0)
    assert cfg.rope_scaling.rope_type == "default" and cfg.rms_norm_eps == 1e-5
    assert embed.shape == (1024, 64) and not embed[VOCAB:].any()
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40))
    tokens[:, -5:] = np.arange(VOCAB - 5, VOCAB)  # the added tokens' rows, the last real ones
    assert _max_logit_diff(loaded.params, cfg, model, tokens) < 1e-4


def test_generate_greedy_equals_transformers(llama2, hf_tokenizer, tmp_path):
    model, _, native = llama2
    prompts = {f"p{i}": text for i, text in enumerate(TEXTS[:3])}
    out = tmp_path / "generations.jsonl"
    assert cli.main(["generate", "--model", native, "--prompts", _jsonl(tmp_path / "p.jsonl", [
        {"id": k, "prompt": v} for k, v in prompts.items()]), "--out", str(out),
        "--max-new-tokens", "16", "--batch-size", "2"]) == 0
    rows = _by_id(out)
    for key, text in prompts.items():
        ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                              do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        got = rows[key]["completion_ids"]
        if rows[key]["finish_reason"] == "stop":  # transformers keeps the eos token
            got = got + [2]
        assert got == want, key


def test_score_equals_transformers(llama2, hf_tokenizer, tmp_path):
    model, _, native = llama2
    items = [("malaria", "First-line treatment for uncomplicated malaria is",
              " artemether-lumefantrine"),
             ("ors", "Give ORS after each loose stool:", " 100 mL under two years"),
             ("chat", "<|im_start|>user\nfever?<|im_end|>\n", "<|im_start|>assistant")]
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--model", native, "--input", _jsonl(tmp_path / "r.jsonl", [
        {"id": i, "context": c, "continuation": x} for i, c, x in items]), "--out", str(out)]) == 0
    rows = _by_id(out)
    for key, context, continuation in items:
        ctx = hf_tokenizer(context)["input_ids"]  # lm-eval's split of a text pair
        whole = hf_tokenizer(context + continuation)["input_ids"]
        assert whole[:len(ctx)] == ctx
        logits = torch.tensor(hf_fixtures.torch_logits(model, [whole])[0], dtype=torch.float64)
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        assert rows[key]["num_tokens"] == len(whole) - len(ctx)
        assert abs(rows[key]["logprob"] - want) < 1e-4, (key, rows[key]["logprob"], want)


def test_train_then_export_reloads_in_transformers(llama2, hf_tokenizer, tmp_path):
    """``train`` (continued pretraining on the corpus, the model's own sentencepiece
    tokenizer, mesh data=2,fsdp=2,tensor=2 over the padded vocabulary), then ``export``:
    transformers loads the trained model with our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, _, native = llama2
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", f"model.init_from={native}", "model.compute_dtype=float32",
                 "model.remat=none", "data.tokenizer=null", "data.eval_file=null",
                 f"data.train_files=[{os.path.join(DATA, 'clinical_corpus.txt')}]",
                 "data.seq_len=64", "data.packing_bins=8", "train.steps=6", "train.batch_size=8",
                 "optim.lr=1e-2", "optim.warmup_steps=1", "checkpoint.every=100",
                 "log.eval_every=0", "log.progress=false", "log.tensorboard=false", "log.plot=false"]
    argv = ["train", "--config", os.path.join(HERE, "..", "configs", "tiny_pretrain.yaml")]
    for override in overrides:
        argv += ["--set", override]
    assert cli.main(argv) == 0
    losses = [row["loss"] for _, row in read_jsonl(run / "metrics.jsonl") if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.4, losses

    out = tmp_path / "hf"
    assert cli.main(["export", "--model", str(run / "model"), "--out", str(out), "--quiet"]) == 0
    with open(out / "config.json", encoding="utf-8") as f:
        assert json.load(f)["vocab_size"] == VOCAB
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.model.embed_tokens.weight.shape == (VOCAB, 64)
    exported_tokenizer = AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer(TEXTS[0])["input_ids"] == hf_tokenizer(TEXTS[0])["input_ids"]
    trained = load_model(run / "model")
    tokens = [hf_tokenizer(TEXTS[1])["input_ids"]]
    assert _max_logit_diff(trained.params, trained.cfg, reloaded, tokens) < 1e-4
