"""Run configs: strict YAML, --set overrides, the shipped configs, and the train command."""
from __future__ import annotations

import glob
import math
import os

import pytest

from meditron_jax.cli import main
from meditron_jax.config import preset
from meditron_jax.errors import UserError
from sharding import parse_mesh_spec
from train.config import RunConfig, load

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
    assert cfg.model.scan_layers is None  # automatic: unrolled only under oneMKL
    assert load(path, ["model.scan_layers=false"]).model.scan_layers is False
    assert RunConfig().to_dict()["train"]["batch_size"] == 8  # constructible from Python too


@pytest.mark.parametrize("text,overrides,match", [
    ("trian:\n  steps: 3\n", [], r"unknown key 'trian'; known keys: output_dir, model"),
    ("train:\n  step: 3\n", [], r"unknown key train\.'step'; known keys in train: steps"),
    ("", ["optim.learning_rate=1"], r"unknown key optim\.'learning_rate'"),
    ("train:\n  steps: three\n", [], r"train\.steps must be an integer, got 'three'"),
    ("model:\n  scan_layers: sometimes\n", [], r"model\.scan_layers must be true or false"),
    ("train: 5\n", [], r"train must be a mapping"),
    ("data:\n  kind: rl\n", [], r"data\.kind must be one of pretrain, sft, got 'rl'"),
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

    assert main(["train", "--set", "trian.steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meditron-jax train: error: run config: unknown key 'trian'")
    assert "\n" not in err and "Traceback" not in err

    assert main(["train", "--config", CONFIGS[-1], "--set", "train.steps=5", "--print-config"]) == 0
    assert '"steps": 5' in capsys.readouterr().out
