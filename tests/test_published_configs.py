"""Published ``config.json`` files of Llama-family checkpoints, kept as their repositories
publish them (tests/data/hf_configs/): each parses to the architecture transformers reads
from it, and each -- every key kept, sizes shrunk -- converts to a model whose logits equal
those of transformers loading the same file.

Where each file comes from (no hub access here: copies found in public GitHub code):
- llama-3.1-8b.json: meta-llama/Llama-3.1-8B. Key for key as the Python-literal copies of
  the file in several repositories (e.g. LLAMA_3_1_8B_2_layer_CONFIG in a TensorRT-LLM
  debugger unit test, which only lowers num_hidden_layers; repository path not named by
  the index); JSON layout ours.
- llama-3.2-1b.json: meta-llama/Llama-3.2-1B (tied embeddings). Key for key as
  Anthony-Lionetti/PyTorch-nn-Tinkering llama_play/configs.py (which drops "architectures")
  and kevinstephano/thunder_model_blocks hf_llama/llama_config.py (from the -Instruct repo,
  same architecture keys).
- llama-3.2-3b.json: meta-llama/Llama-3.2-3B. Key for key as a Rust test's inline copy
  (test_parse_and_validate_llama_3_2_3b, repository not named by the index).
- meditron3-8b.json: OpenMeditron/Meditron3-8B. RECONSTRUCTED, no copy found: the
  Llama-3.1-8B architecture it continues from, written as transformers 4.45 saves it
  (head_dim present); eos_token_id 128001 as in this project's "meditron3-8b" preset;
  transformers_version is a guess.
- meditron-7b.json: epfl-llm/meditron-7b (Llama-2-7B based, vocab 32017). RECONSTRUCTED,
  no copy found: the keys LlamaConfig(...).save_pretrained() wrote in late 2023, which is
  how epfLLM/Megatron-LLM's weights_conversion/megatron_to_hf.py exports (padded vocab,
  max_position_embeddings = seq_length 4096); transformers_version is a guess.
- tinyllama-1.1b-chat-v1.0.json: TinyLlama/TinyLlama-1.1B-Chat-v1.0. Verbatim (values and
  key order) from a Rust test's TINYLLAMA_CONFIG constant (repository not named by the
  index); JSON layout ours.
- smollm2-135m.json: HuggingFaceTB/SmolLM2-135M. Verbatim from nirmalpratheep/SmolLMV2-Base
  README.md ("Downloaded the SmolLMv2 config from Hugging Face"; the config.json in that
  repository adds a "device" key, left out here). Holds is_llama_config and
  rope_interleaved, as published.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

from meditron_jax.model import config
from meditron_jax.model.config import LlamaConfig, preset
from meditron_jax.io.convert import convert_to_native
from meditron_jax.io.loading import load_model
from meditron_jax.model import forward
from tests import hf_fixtures

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_configs")
NAMES = sorted(f[:-len(".json")] for f in os.listdir(DATA) if f.endswith(".json"))

# What each checkpoint's model card says the architecture is.
EXPECTED = {
    "llama-3.1-8b": dict(heads=32, kv_heads=8, head_dim=128, rope=("llama3", 8.0),
                         theta=500000.0, tied=False, vocab=128256, eos=(128001,)),
    "llama-3.2-1b": dict(heads=32, kv_heads=8, head_dim=64, rope=("llama3", 32.0),
                         theta=500000.0, tied=True, vocab=128256, eos=(128001,)),
    "llama-3.2-3b": dict(heads=24, kv_heads=8, head_dim=128, rope=("llama3", 32.0),
                         theta=500000.0, tied=True, vocab=128256, eos=(128001,)),
    "meditron3-8b": dict(heads=32, kv_heads=8, head_dim=128, rope=("llama3", 8.0),
                         theta=500000.0, tied=False, vocab=128256, eos=(128001,)),
    "meditron-7b": dict(heads=32, kv_heads=32, head_dim=128, rope=("default", 1.0),
                        theta=10000.0, tied=False, vocab=32017, eos=(2,)),
    "smollm2-135m": dict(heads=9, kv_heads=3, head_dim=64, rope=("default", 1.0),
                         theta=100000.0, tied=True, vocab=49152, eos=(0,)),
    "tinyllama-1.1b-chat-v1.0": dict(heads=32, kv_heads=4, head_dim=64, rope=("default", 1.0),
                                     theta=10000.0, tied=False, vocab=32000, eos=(2,)),
}
UNUSED_KEYS = {"smollm2-135m": "is_llama_config"}  # the rest use every key they hold

HEAD_DIM, LAYERS, VOCAB = 16, 2, 384
SEQ, START = 12, 1000  # positions START.. reach llama3's scaled bands (wavelengths > 2048)
TOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(config, "_warned", set())  # each test sees its own warnings


def published(name: str) -> dict:
    with open(os.path.join(DATA, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def derived(cfg: LlamaConfig) -> dict:
    return dict(heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim, rope=(cfg.rope_scaling.rope_type, cfg.rope_scaling.factor),
                theta=cfg.rope_theta, tied=cfg.tie_word_embeddings, vocab=cfg.vocab_size,
                eos=cfg.eos_token_id)


def shrink(hf: dict) -> dict:
    """The same keys at test sizes: 2 layers, head_dim 16, at most 2 KV heads with the
    published query heads per KV head, vocab 384."""
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    small_kv = min(kv_heads, 2)
    small_heads = small_kv * (heads // kv_heads)
    hidden = small_heads * HEAD_DIM
    small = dict(hf, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                 num_attention_heads=small_heads, vocab_size=VOCAB)
    for key, value in (("num_key_value_heads", small_kv), ("head_dim", HEAD_DIM)):
        if key in hf:
            small[key] = value
    return small


def test_every_file_is_listed():
    assert NAMES == sorted(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_published_config_parses_as_transformers_reads_it(name, caplog):
    from transformers import LlamaConfig as HFConfig
    hf = published(name)
    with caplog.at_level(logging.WARNING, logger="meditron_jax.model.config"):
        cfg = LlamaConfig.from_hf(dict(hf))
    assert derived(cfg) == EXPECTED[name]
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ([f"config.json: ignoring key(s) the Llama architecture does not use: "
                       f"{UNUSED_KEYS[name]}"] if name in UNUSED_KEYS else [])
    theirs = HFConfig.from_dict(dict(hf))
    rope = theirs.rope_parameters
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.rope_scaling.rope_type,
            cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
        theirs.head_dim, theirs.num_key_value_heads, rope["rope_theta"], rope["rope_type"],
        theirs.rms_norm_eps, theirs.max_position_embeddings, theirs.tie_word_embeddings)
    if rope["rope_type"] == "llama3":
        assert cfg.rope_scaling.summary() == (
            f"llama3: factor {rope['factor']:g}, low_freq_factor {rope['low_freq_factor']:g}, "
            f"high_freq_factor {rope['high_freq_factor']:g}, original_max_position_embeddings "
            f"{rope['original_max_position_embeddings']}")


def test_published_llama_configs_equal_the_presets():
    base_eos = dict(eos_token_id=(128001,))  # base models end documents with <|end_of_text|>
    assert LlamaConfig.from_hf(published("llama-3.1-8b")) == preset("llama-3.1-8b").replace(
        **base_eos)
    assert LlamaConfig.from_hf(published("meditron3-8b")) == preset("meditron3-8b")


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_checkpoint_converts_with_transformers_logits(name, tmp_path):
    """Random weights under the published keys (std 0.25, so a misread eps, theta or rope
    scaling shows); transformers reloads the snapshot from the published-style
    config.json (save_pretrained rewrites it), we convert that snapshot."""
    import torch
    from transformers import LlamaForCausalLM

    small = shrink(published(name))
    src = tmp_path / "hf"
    hf_fixtures.make_hf_model(std=0.25, seed=NAMES.index(name), **small).save_pretrained(src)
    (src / "config.json").write_text(json.dumps(small, indent=2))
    reference = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    convert_to_native(str(src), str(tmp_path / "native"), quiet=True)
    loaded = load_model(tmp_path / "native")
    assert loaded.cfg == LlamaConfig.from_hf(small)

    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    positions = np.tile(START + np.arange(SEQ, dtype=np.int32), (len(tokens), 1))
    ours, _ = jax.jit(forward, static_argnames="cfg")(
        loaded.params, tokens, loaded.cfg, positions=positions)
    theirs = hf_fixtures.torch_logits(reference, tokens, position_ids=positions)
    assert np.abs(np.asarray(ours) - theirs).max() <= TOL
