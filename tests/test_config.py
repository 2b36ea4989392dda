"""Architecture config: HF round trips, both rope spellings, presets, bad input."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import pytest

from meditron_jax.model import config
from meditron_jax.model.config import PRESETS, LlamaConfig, RopeScaling, preset
from meditron_jax.errors import UserError
from meditron_jax.model import abstract_params, count_params, param_specs
from tests import hf_fixtures

# Llama-3.1-8B-Instruct's config.json as published (transformers-4 spelling; the base
# model's is in tests/data/hf_configs/).
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


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(config, "_warned", set())  # each test sees its own warnings


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


L3 = LLAMA31_8B_HF["rope_scaling"]
NO_ROPE = {k: v for k, v in LLAMA31_8B_HF.items() if k not in ("rope_scaling", "rope_theta")}

MATH_CHANGING = [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"hidden_act": "gelu"}, 'hidden_act="gelu" is not supported'),
    ({"rope_interleaved": True}, "rope_interleaved=true is not supported"),
    ({"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
    ({"pretraining_tp": True}, "pretraining_tp=true is not supported"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"rope_scaling": dict(L3, partial_rotary_factor=0.5)},
     "rope_scaling.partial_rotary_factor=0.5 is not supported"),
    ({"model_type": "mistral"}, 'model_type="mistral" is not supported'),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
     "quantization_config is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling has rope type 'yarn', which is not implemented"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}},
     "rope_scaling has rope type 'dynamic', which is not implemented"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "factor": 4.0}},
     "rope_parameters has rope type 'longrope', which is not implemented"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "llama3 rope scaling needs low_freq_factor, high_freq_factor (in rope_scaling)"),
    ({"rope_scaling": {"type": "linear"}}, "linear rope scaling needs factor (in rope_scaling)"),
    ({"hidden_size": 4100}, "head_dim is not given and hidden_size 4100 is not a multiple of "
                            "num_attention_heads 32"),
    ({"head_dim": 63}, "head_dim must be even for RoPE, got 63"),
    ({"num_key_value_heads": 5}, "num_attention_heads (32) must be a multiple of "
                                 "num_key_value_heads (5)"),
]
BAD_NUMBERS = [
    ({"max_position_embeddings": 12.5}, "max_position_embeddings must be a positive integer, "
                                        "got 12.5"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"hidden_size": "4096"}, "hidden_size must be a positive integer, got '4096'"),
    ({"intermediate_size": -14336}, "intermediate_size must be a positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
    ({"num_attention_heads": 32.0}, "num_attention_heads must be a positive integer, got 32.0"),
    ({"head_dim": 64.5}, "head_dim must be a positive integer, got 64.5"),
    ({"bos_token_id": "one"}, "bos_token_id must be a token id (an integer >= 0) or null, "
                              "got 'one'"),
    ({"pad_token_id": -1}, "pad_token_id must be a token id (an integer >= 0) or null, got -1"),
    ({"eos_token_id": [128001, "128009"]}, "eos_token_id must be a token id or a list of "
                                           "token ids (integers >= 0), got [128001, '128009']"),
    ({"eos_token_id": True}, "eos_token_id must be a token id or a list of token ids"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number, got '1e-5'"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number, got nan"),
    ({"rope_theta": "5e5"}, "rope_theta must be a positive number, got '5e5'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false, got 0"),
    ({"rope_scaling": dict(L3, factor=0.0)}, "rope_scaling.factor must be a positive number, "
                                             "got 0.0"),
    ({"rope_scaling": dict(L3, factor=-8)}, "rope_scaling.factor must be a positive number"),
    ({"rope_scaling": dict(L3, low_freq_factor=4.0)},
     "rope_scaling.low_freq_factor (4) must be below rope_scaling.high_freq_factor (4)"),
    ({"rope_scaling": dict(L3, original_max_position_embeddings=8192.5)},
     "rope_scaling.original_max_position_embeddings must be a positive integer, got 8192.5"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object or null, got 'llama3'"),
]
DISAGREEING = [  # transformers 5 reads the first of each pair
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
     "rope_scaling (llama3: factor 8, low_freq_factor 1, high_freq_factor 4, "
     "original_max_position_embeddings 8192) and rope_parameters (default) disagree"),
    ({"rope_parameters": dict(L3, factor=16.0)}, "rope_scaling (llama3: factor 8,"),
    ({"rope_parameters": dict(L3, rope_theta=1e6)},
     "rope_theta (500000) and rope_parameters.rope_theta (1e+06) disagree"),
    ({"rope_scaling": dict(L3, rope_theta=1e6)},
     "rope_theta (500000) and rope_scaling.rope_theta (1e+06) disagree"),
]


@pytest.mark.parametrize("change,message", MATH_CHANGING + BAD_NUMBERS + DISAGREEING)
def test_refusals_are_one_line_naming_the_key(change, message):
    with pytest.raises(UserError, match=re.escape(message)) as exc:
        LlamaConfig.from_hf(dict(LLAMA31_8B_HF, **change))
    assert str(exc.value).startswith("config.json: ") and "\n" not in str(exc.value)


@pytest.mark.parametrize("change", [
    {"hidden_act": "swish"}, {"attention_bias": None}, {"rope_interleaved": False},
    {"partial_rotary_factor": 1.0}, {"attention_dropout": 0}, {"quantization_config": None},
    {"rope_scaling": dict(L3, type="llama3")}, {"rope_parameters": dict(L3)},
    {"rope_parameters": dict(L3, rope_theta=500000)}, {"rope_scaling": {}, "rope_parameters": L3},
])
def test_llama_values_and_agreeing_spellings_are_accepted(change):
    assert LlamaConfig.from_hf(dict(LLAMA31_8B_HF, **change)) == preset("llama-3.1-8b")


@pytest.mark.parametrize("rope", [
    dict(rope_theta=500000.0, rope_scaling=L3),
    dict(rope_parameters=dict(L3, rope_theta=500000.0)),
    dict(rope_theta=500000.0, rope_scaling=L3, rope_parameters=dict(L3, rope_theta=500000.0)),
    dict(rope_scaling={"type": "linear", "factor": 2.0},
         rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_theta=1e6),
    dict(rope_theta=1e6, rope_parameters={"rope_type": "linear", "factor": 4.0}),
    dict(rope_scaling={}, rope_parameters=dict(L3, rope_theta=250000.0)),
    dict(rope_parameters={k: v for k, v in L3.items() if k != "original_max_position_embeddings"}),
    dict(rope_scaling=None, rope_theta=100000),
    dict(rope_scaling={"rope_type": "default", "factor": 8.0}),
    {},
], ids=["t4", "t5", "both", "both-legacy-type", "t5-top-theta", "empty-t4", "llama3-no-original",
        "null-scaling", "default-with-factor", "none"])
def test_rope_reads_as_transformers_standardizes_it(rope):
    """Every accepted spelling gives the theta and scaling transformers 5 computes with."""
    from transformers import LlamaConfig as HFConfig
    hf = dict(NO_ROPE, **rope)
    ours = LlamaConfig.from_hf(json.loads(json.dumps(hf)))
    theirs = HFConfig.from_dict(json.loads(json.dumps(hf))).rope_parameters
    params = {k: v for k, v in theirs.items() if k not in ("rope_type", "rope_theta", "type")}
    if theirs["rope_type"] == "default":
        params = {}  # its inverse frequencies read no scaling key
    assert ours.rope_theta == theirs["rope_theta"]
    assert ours.rope_scaling == RopeScaling(theirs["rope_type"], **params)


def test_unknown_keys_are_named_in_one_warning(tmp_path, caplog):
    hf = dict(LLAMA31_8B_HF, is_llama_config=True, rope_interleaved=False, bos_token="<s>",
              unsloth_version="2024.9", sliding_window=4096, rope_scaling=dict(L3, mscale=1.0),
              **{"transformers.js_config": {"kv_cache_dtype": {"fp16": "float16"}}})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with caplog.at_level(logging.WARNING, logger="meditron_jax.model.config"):
        cfg = LlamaConfig.from_hf(tmp_path)
        LlamaConfig.from_hf(tmp_path)  # a command that reads the file twice warns once
    assert cfg == preset("llama-3.1-8b")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'config.json'}: ignoring key(s) the Llama architecture does not use: "
        "bos_token, is_llama_config, rope_scaling.mscale, sliding_window, "
        "transformers.js_config, unsloth_version"]


def test_transformers_own_configs_warn_nothing(caplog):
    from transformers import LlamaConfig as HFConfig
    theirs = HFConfig(**hf_fixtures.TINY_HF)
    with caplog.at_level(logging.WARNING, logger="meditron_jax.model.config"):
        for hf in (theirs.to_dict(), json.loads(theirs.to_json_string()), preset("tiny").to_hf()):
            LlamaConfig.from_hf(hf)
    assert not caplog.records


def test_cli_shows_the_warning_as_one_stderr_line(tmp_path):
    """The CLI prints library warnings like its errors: one line, before the command's own
    output (here: no weights, exit 2)."""
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(
        hf_fixtures.TINY_HF, is_llama_config=True, **{"transformers.js_config": {}})))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from cli.main import main; "
         "sys.exit(main(sys.argv[1:]))", "convert", "--model", str(src),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[0] == (f"meditron-jax convert: warning: {src / 'config.json'}: ignoring key(s) the Llama architecture does "
                        "not use: is_llama_config, transformers.js_config")
    assert len(lines) == 2 and "safetensors" in lines[1], proc.stderr


def test_missing_field_and_malformed_file(tmp_path):
    hf = dict(LLAMA31_8B_HF)
    del hf["vocab_size"]
    with pytest.raises(UserError, match="missing required field.*vocab_size"):
        LlamaConfig.from_hf(hf)
    with pytest.raises(UserError, match="not found"):
        LlamaConfig.from_hf(tmp_path)
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 12,')
    with pytest.raises(UserError, match="malformed JSON"):
        LlamaConfig.from_hf(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        LlamaConfig.from_hf(tmp_path)
    path.write_bytes(json.dumps(dict(LLAMA31_8B_HF, _name_or_path="méditron"),
                                ensure_ascii=False).encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(f"{path}: not UTF-8 text (byte ")) as exc:
        LlamaConfig.from_hf(tmp_path)
    assert "\n" not in str(exc.value)


def test_wrongly_typed_fields_are_refused_in_code_too():
    """``replace`` (the run config's model.overrides) checks like config.json does."""
    with pytest.raises(UserError, match=re.escape("config: rms_norm_eps must be a positive "
                                                  "number, got '1e-5'")):
        preset("tiny").replace(rms_norm_eps="1e-5")
    with pytest.raises(UserError, match="config: rope_scaling.low_freq_factor"):
        RopeScaling("llama3", 8.0, 4.0, 1.0, 32)


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
