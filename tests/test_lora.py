"""LoRA: only adapters train, the PEFT-format save, the merge, and transformers parity."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.io.hf_keys import hf_from_params, params_from_hf
from meditron_jax.model.lora import (LoraConfig, init_lora, load_adapters, load_and_merge, save_adapters)
from meditron_jax.model import forward
from sharding import TRAIN_RULES, make_mesh
from tests.hf_fixtures import make_hf_model, make_hf_snapshot, state_dict_numpy
from tests.train_support import QA, tiny_run
from train.config import OptimSection
from train.optim import make_optimizer, schedule
from train.step import (StepOptions, abstract_state, init_state, jit_train_step,
                        make_train_step, state_shardings)

LCFG = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))


@pytest.fixture(scope="module")
def base():
    model = make_hf_model(std=0.25, seed=3)
    cfg = LlamaConfig.from_hf(model.config.to_dict())
    return cfg, params_from_hf({k: v.copy() for k, v in state_dict_numpy(model).items()}, cfg)


@pytest.fixture(scope="module")
def trained(base):
    """Three LoRA steps on one batch with the real (jitted, donated) train step."""
    cfg, params = base
    mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    opt = OptimSection(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0)
    optimizer = make_optimizer(opt, 10)
    opts = StepOptions(compute_dtype=jnp.float32, remat="none", lora=LCFG)
    sh = state_shardings(cfg, abstract_state(cfg, optimizer, jnp.float32, LCFG), mesh,
                         TRAIN_RULES, LCFG)
    step = jit_train_step(make_train_step(cfg, optimizer, schedule(opt, 10), opts), sh, mesh,
                          TRAIN_RULES)
    adapters0 = jax.device_get(init_lora(cfg, LCFG, jax.random.key(0)))
    state = jax.device_put(init_state(jax.tree.map(jnp.asarray, adapters0), optimizer,
                                      jax.tree.map(jnp.asarray, params)), sh)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((2, 16), np.float32),
             "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}
    losses = []
    for _ in range(3):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return adapters0, jax.device_get(state), losses, seq


def test_only_adapters_train(base, trained):
    _, params = base
    adapters0, state, losses, _ = trained
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # the base never moves (bitwise)
    for t in LCFG.targets:
        assert np.abs(state.params[t]["b"]).max() > 0  # b starts at 0 and learns
        assert not np.array_equal(state.params[t]["a"], adapters0[t]["a"])
    assert losses[-1] < losses[0]


def test_peft_files_round_trip_and_merge_is_base_plus_scaled_product(base, trained, tmp_path):
    cfg, params = base
    _, state, _, _ = trained
    path = save_adapters(state.params, LCFG, tmp_path / "adapter", base_model="tiny")
    conf = json.load(open(os.path.join(path, "adapter_config.json")))
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert sorted(conf["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    loaded, lcfg, scale = load_adapters(path, cfg)
    assert scale == 2.0 and set(lcfg.targets) == set(LCFG.targets)
    for t in LCFG.targets:
        for w in ("a", "b"):
            np.testing.assert_array_equal(loaded[t][w], state.params[t][w])

    # independent check in the HF layout: W' = W + (alpha / r) * lora_B @ lora_A
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    merged = hf_from_params(jax.device_get(load_and_merge(params, cfg, path)), cfg)
    original = hf_from_params(params, cfg)
    modules = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "down": "mlp.down_proj"}
    for name in original:
        want = original[name]
        for t, module in modules.items():
            if f".{module}." in name:
                i = int(name.split(".")[2])
                pre = f"base_model.model.model.layers.{i}.{module}"
                want = want + 2.0 * tensors[f"{pre}.lora_B.weight"] @ tensors[f"{pre}.lora_A.weight"]
        np.testing.assert_allclose(merged[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    untouched = [n for n in original if "k_proj" in n or "gate_proj" in n or "norm" in n]
    assert all(np.array_equal(merged[n], original[n]) for n in untouched)


def test_merged_model_in_transformers_reproduces_the_lora_forward(base, trained, tmp_path):
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    cfg, params = base
    _, state, _, seq = trained
    ours, _ = forward(jax.tree.map(jnp.asarray, params), jnp.asarray(seq), cfg,
                      lora=(jax.tree.map(jnp.asarray, state.params), LCFG.scale))
    path = save_adapters(state.params, LCFG, tmp_path / "adapter")
    merged = hf_from_params(jax.device_get(load_and_merge(params, cfg, path)), cfg)
    model = LlamaForCausalLM(HFConfig(**cfg.to_hf())).eval()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in merged.items()})
    with torch.no_grad():
        theirs = model(torch.as_tensor(seq, dtype=torch.long)).logits.numpy()
    ours = np.asarray(ours)
    assert np.abs(ours - jax.device_get(forward(params, seq, cfg)[0])).max() > 1e-2  # adapters matter
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_lora_run_saves_only_adapters_and_resumes(tmp_path):
    """The user path: train --set lora.rank=... from an HF snapshot (SFT)."""
    import orbax.checkpoint as ocp
    from train.loop import run_training
    hf = make_hf_snapshot(tmp_path / "hf", vocab_size=512)
    run = tiny_run(tmp_path / "run", model={"init_from": hf, "preset": None},
                   data={"kind": "sft", "train_files": [QA], "seq_len": 64, "overlong": "truncate"},
                   train={"steps": 4, "mesh": "fsdp=1", "grad_accum": 1},
                   lora={"rank": 2, "alpha": 4.0, "targets": ["q", "v"]}, checkpoint={"every": 2})
    first = run_training(run.replace(train=dataclasses.replace(run.train, steps=2)))
    assert first["adapter"] and os.path.exists(os.path.join(first["adapter"], "adapter_model.safetensors"))
    meta = ocp.StandardCheckpointer().metadata(os.path.join(first["checkpoints"], "2", "params"))
    assert set(meta.item_metadata.tree) == {"q", "v"}  # no base weights in the checkpoint
    second = run_training(run)
    assert second["start_step"] == 2 and second["steps"] == 4


def test_bad_adapter_directories(base, trained, tmp_path):
    cfg, params = base
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_and_merge(params, cfg, tmp_path)
    path = save_adapters(trained[1].params, LCFG, tmp_path / "a")
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :-1].copy()
    save_file(tensors, file)
    with pytest.raises(UserError, match=r"q_proj.lora_A.weight has shape \(4, 63\), expected \(4, 64\)"):
        load_and_merge(params, cfg, path)
    conf = json.load(open(os.path.join(path, "adapter_config.json")))
    conf["target_modules"] = ["q_proj", "lm_head"]
    json.dump(conf, open(os.path.join(path, "adapter_config.json"), "w"))
    with pytest.raises(UserError, match=r"unsupported target module\(s\) \['lm_head'\]"):
        load_and_merge(params, cfg, path)
