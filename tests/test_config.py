"""Architecture config: HF round trips, both rope spellings, presets, bad input."""
from __future__ import annotations

import json

import jax
import pytest

from meditron_jax.config import PRESETS, LlamaConfig, RopeScaling, preset
from meditron_jax.errors import UserError
from meditron_jax.model import abstract_params, count_params, param_specs

# Llama-3.1-8B's config.json as published (transformers-4 spelling).
LLAMA31_8B_HF = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def test_published_llama31_config_equals_preset():
    assert LlamaConfig.from_hf(LLAMA31_8B_HF) == preset("llama-3.1-8b")


def test_meditron_preset_is_the_base_architecture_with_base_model_eos():
    m, l = preset("meditron3-8b"), preset("llama-3.1-8b")
    assert m.bos_token_id == 128000 and m.eos_token_id == (128001,)
    assert m.replace(eos_token_id=l.eos_token_id) == l


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_round_trip(name):
    cfg = preset(name)
    assert LlamaConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_transformers5_rope_parameters_spelling():
    hf = dict(LLAMA31_8B_HF)
    scaling = hf.pop("rope_scaling")
    theta = hf.pop("rope_theta")
    hf["rope_parameters"] = dict(scaling, rope_theta=theta)
    assert LlamaConfig.from_hf(hf) == preset("llama-3.1-8b")


def test_transformers_reads_our_export_and_agrees():
    from transformers import LlamaConfig as HFConfig
    cfg = preset("tiny").replace(rope_scaling=RopeScaling("linear", factor=2.0))
    hf = HFConfig(**cfg.to_hf())
    back = LlamaConfig.from_hf(hf.to_dict())
    assert back == cfg


def test_legacy_type_key_and_default_rope():
    hf = dict(LLAMA31_8B_HF, rope_scaling={"type": "linear", "factor": 2.0})
    assert LlamaConfig.from_hf(hf).rope_scaling == RopeScaling("linear", factor=2.0)
    hf = dict(LLAMA31_8B_HF, rope_scaling=None, rope_theta=10000.0)
    cfg = LlamaConfig.from_hf(hf)
    assert cfg.rope_scaling.rope_type == "default" and cfg.rope_theta == 10000.0


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "unsupported rope type 'dynamic'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"model_type": "mistral"}, "model_type"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling needs"),
    ({"hidden_size": "4096"}, "hidden_size must be an integer"),
])
def test_unsupported_fields_are_named(change, message):
    with pytest.raises(UserError, match=message):
        LlamaConfig.from_hf(dict(LLAMA31_8B_HF, **change))


def test_missing_field_and_malformed_file(tmp_path):
    hf = dict(LLAMA31_8B_HF)
    del hf["vocab_size"]
    with pytest.raises(UserError, match="missing required field.*vocab_size"):
        LlamaConfig.from_hf(hf)
    with pytest.raises(UserError, match="not found"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 12,')
    with pytest.raises(UserError, match="malformed JSON"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        LlamaConfig.from_hf(tmp_path)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown model preset"):
        preset("llama-9b")


def test_full_8b_abstract_shapes_without_allocation():
    cfg = preset("meditron3-8b")
    before = _live_bytes()
    shapes = abstract_params(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert count_params(shapes) == 8_030_261_248 == cfg.num_params()
    assert _live_bytes() - before < 1 << 20  # nothing the size of a weight was allocated
    assert shapes["layers"]["q"].shape == (32, 4096, 32, 128)
    assert shapes["layers"]["k"].shape == (32, 4096, 8, 128)
    # every parameter names one logical axis per dimension
    for spec in jax.tree.leaves(param_specs(cfg), is_leaf=lambda s: hasattr(s, "axes")):
        assert len(spec.axes) == len(spec.shape)


def test_flops_per_token_is_6n_plus_attention():
    cfg = preset("meditron3-8b")
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size - (
        2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    per_token = cfg.flops_per_token(2048, training=True)
    attention = 3 * 2 * cfg.num_hidden_layers * 4096 * 2048
    assert per_token == 6 * matmul_params + attention


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())
