"""Run configs: strict YAML, --set overrides, the shipped configs, and the train command."""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import typing

import pytest

from cli.main import main
from meditron_jax.model.config import preset
from meditron_jax.errors import UserError
from sharding import parse_mesh_spec
from train.config import RANGES, RunConfig, from_dict, load

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "output_dir: r\ntrain:\n  steps: 7\noptim:\n  lr: 3e-4\n"
                           "lora:\n  targets: q\n")
    cfg = load(path, ["train.grad_accum=4", "train.batch_size=16", "data.train_files=[a.txt, b.txt]",
                      "optim.clip_norm=null"])
    assert cfg.train.steps == 7 and cfg.train.grad_accum == 4
    assert cfg.optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; still a float here
    assert cfg.data.train_files == ("a.txt", "b.txt") and cfg.lora.targets == ("q",)
    assert cfg.optim.clip_norm is None
    assert cfg.model.attention == "auto"  # meditron_jax.kernels picks per platform
    assert load(path, ["model.attention=xla"]).model.attention == "xla"
    assert RunConfig().to_dict()["train"]["batch_size"] == 8  # constructible from Python too


@pytest.mark.parametrize("text,overrides,match", [
    ("trian:\n  steps: 3\n", [], r"unknown key 'trian'; known keys: output_dir, model"),
    ("train:\n  step: 3\n", [], r"unknown key train\.'step'; known keys in train: steps"),
    ("", ["optim.learning_rate=1"], r"unknown key optim\.'learning_rate'"),
    ("train:\n  steps: three\n", [], r"train\.steps must be an integer, got 'three'"),
    ("model:\n  verify: sometimes\n", [], r"model\.verify must be true or false"),
    ("model:\n  attention: flash\n", [], r"model\.attention must be one of auto, xla, splash, cudnn"),
    ("train: 5\n", [], r"train must be a mapping"),
    ("data:\n  kind: rl\n", [], r"data\.kind must be one of pretrain, sft, chat, preference, got 'rl'"),
    ("train:\n  batch_size: 6\n  grad_accum: 4\n", [], r"multiple of train\.grad_accum"),
    ("lora:\n  rank: 4\n  targets: [q, lm_head]\n", [], r"lora\.targets"),
    ("log:\n  eval_every: 10\n", [], r"log\.eval_every needs data\.eval_file"),
    ("train:\n  steps: [1\n", [], r"run\.yaml:3: malformed YAML"),
    ("", ["train.steps"], r"expected KEY=VALUE"),
    ("", ["train.steps=0"], r"train\.steps must be > 0"),
])
def test_bad_configs(tmp_path, text, overrides, match):
    with pytest.raises(UserError, match=match):
        load(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="run config not found"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_configs_are_consistent(path):
    cfg = load(path)
    model = preset("meditron3-8b") if "8b" in os.path.basename(path) else preset("tiny")
    devices = {"meditron3_8b_cpt_tpu.yaml": 32, "meditron3_8b_sft_8xh100.yaml": 8}.get(
        os.path.basename(path), 8)
    mesh = parse_mesh_spec(cfg.train.mesh, devices)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    assert micro % (mesh["data"] * mesh["fsdp"]) == 0
    assert model.num_key_value_heads % mesh["tensor"] == 0
    assert cfg.data.seq_len <= model.max_position_embeddings
    if "tiny" in path:
        assert all(os.path.exists(os.path.join(ROOT, f)) for f in cfg.data.train_files)
    assert math.isfinite(cfg.optim.lr)


def test_train_command_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "(default: [])" in out and "--config" in out
    assert "exit status:" in out and "130  stopped by Ctrl-C (checkpoint saved)" in out

    assert main(["train", "--set", "trian.steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meditron-jax train: error: run config: unknown key 'trian'")
    assert "\n" not in err and "Traceback" not in err

    assert main(["train", "--config", CONFIGS[-1], "--set", "train.steps=5", "--print-config"]) == 0
    assert '"steps": 5' in capsys.readouterr().out


# ---- every number has a range -------------------------------------------------------------
def _numeric_fields(cls=RunConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{f.name}.")
        elif {int, float} & ({tp} | set(typing.get_args(tp))):
            yield prefix + f.name, float in ({tp} | set(typing.get_args(tp)))


NUMERIC = dict(_numeric_fields())
OUTSIDE = {"> 0": [0, -1], ">= 0": [-1], "in [0, 1]": [-0.5, 1.5], "in [0, 1)": [-3, 1, 1.5]}


def test_every_numeric_field_has_a_range():
    assert set(NUMERIC) == set(RANGES)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_numbers_out_of_range_name_the_key(key):
    section, name = key.split(".")
    what = RANGES[key][0]
    is_float = NUMERIC[key]
    for bad in OUTSIDE[what] + ([] if is_float else [2**31]):  # ints: 32-bit on the device
        if not is_float and isinstance(bad, float):
            continue
        with pytest.raises(UserError, match=rf"^run config: {re.escape(key)} must be "):
            from_dict({section: {name: bad}})
    if is_float:
        for bad in (".nan", ".inf", "-.inf", "'x'", "[1]"):
            with pytest.raises(UserError, match=rf"{re.escape(key)} must be a finite number"):
                load(None, [f"{key}={bad}"])
    else:
        with pytest.raises(UserError, match=rf"{re.escape(key)} must be an integer, got 1\.5"):
            from_dict({section: {name: 1.5}})


@pytest.mark.parametrize("text,match", [
    ("optim:\n  b1: -3\n", r"optim\.b1 must be in \[0, 1\), got -3\.0"),
    ("optim:\n  b2: 1.5\n", r"optim\.b2 must be in \[0, 1\), got 1\.5"),
    ("optim:\n  eps: -1\n", r"optim\.eps must be > 0, got -1\.0"),
    ("optim:\n  weight_decay: .nan\n", r"optim\.weight_decay must be a finite number, got nan"),
    ("optim:\n  lr: .inf\n", r"optim\.lr must be a finite number, got inf"),
    ("train:\n  seed: 4294967296\n", r"train\.seed must be <= 2147483647"),
    ("output_dir: ''\n", r"output_dir must not be empty"),
])
def test_issue_cases_are_one_line(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load(write(tmp_path, text))


# ---- model.overrides: typed like LlamaConfig's fields ---------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ("[1, 2]", r"model\.overrides must be a mapping, got \[1, 2\]"),
    ("big", r"model\.overrides must be a mapping, got 'big'"),
    ("{rms_norm_eps: abc}", r"model\.overrides\.rms_norm_eps must be a finite number, got 'abc'"),
    ("{num_hidden_layers: two}", r"model\.overrides\.num_hidden_layers must be an integer"),
    ("{max_position_embeddings: 12.5}", r"model\.overrides\.max_position_embeddings must be an "
                                        r"integer, got 12\.5"),
    ("{bos_token_id: one}", r"model\.overrides\.bos_token_id must be an integer, got 'one'"),
    ("{rope_scaling: 3}", r"model\.overrides\.rope_scaling must be a mapping"),
    ("{rope_scaling: {factor: x}}", r"model\.overrides\.rope_scaling\.factor must be a finite"),
    ("{hidden: 8}", r"unknown key model\.overrides\.'hidden'; known keys in model\.overrides: "
                    r"vocab_size"),
])
def test_bad_model_overrides_are_one_line_before_jax_starts(overrides, match):
    with pytest.raises(UserError, match=match):
        load(None, [f"model.overrides={overrides}"])


def test_model_overrides_reach_the_architecture():
    from train.setup import model_config
    cfg = model_config(load(None, ["model.overrides={intermediate_size: 96, eos_token_id: 7, "
                                   "rope_scaling: {rope_type: linear, factor: 2}}"]))
    assert cfg.intermediate_size == 96 and cfg.eos_token_id == (7,)
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 2.0)
    with pytest.raises(UserError, match=r"^run config: model\.overrides: .*rms_norm_eps"):
        model_config(load(None, ["model.overrides={rms_norm_eps: -1}"]))
