"""LoRA adapters between us and PEFT, end to end. An adapter from the real trainer:
``export --lora`` merges it into an HF snapshot that transformers loads, and PEFT loads
the adapter directory itself onto the transformers base model; PEFT's logits, the merged
export's and our forward with the adapters all agree (float32). The other way, an adapter
PEFT wrote merges into PEFT's model, and PEFT options a plain merge would get wrong are
refused."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.numpy import load_file

from cli import main as cli
from meditron_jax.io.loading import load_model
from meditron_jax.model.lora import CONFIG_FILE, TARGETS, WEIGHTS_FILE, load_adapters
from meditron_jax.model import forward
from tests.hf_fixtures import make_hf_snapshot
from tests.train_support import QA, tiny_run

VOCAB = 512
SEQ = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)


def hf_model(path):
    import torch
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(SEQ, dtype=torch.long)).logits.numpy()


def export(base: str, adapter: str, out: str) -> int:
    return cli.main(["export", "--model", base, "--lora", adapter, "--out", out,
                     "--dtype", "float32", "--quiet"])


def assert_same_model(got: np.ndarray, want: np.ndarray, base: np.ndarray, name: str):
    """Equal to float32 precision, and the adapter did change the model."""
    big = np.abs(want).max()
    assert np.abs(want - base).max() > 0.05 * big, "the adapter changes nothing"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * big, err_msg=name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random transformers Llama as the base, three LoRA SFT steps on every target
    (sharded fsdp x tensor), then ``meditron-jax export --lora``."""
    from train.loop import run_training
    tmp = tmp_path_factory.mktemp("lora_peft")
    base = make_hf_snapshot(tmp / "base", vocab_size=VOCAB)
    run = tiny_run(tmp / "run", model={"init_from": base, "preset": None, "remat": "none"},
                   data={"kind": "sft", "train_files": [QA], "seq_len": 64,
                         "overlong": "truncate"},
                   optim={"lr": 1e-2, "warmup_steps": 0, "decay": "constant",
                          "weight_decay": 0.0},
                   train={"steps": 3, "batch_size": 4, "grad_accum": 1,
                          "mesh": "fsdp=2,tensor=2"},
                   lora={"rank": 4, "alpha": 8.0, "targets": list(TARGETS)},
                   checkpoint={"every": 100})
    adapter = run_training(run)["adapter"]
    merged = str(tmp / "merged")
    assert export(base, adapter, merged) == 0
    return base, adapter, merged


def test_peft_loads_our_adapter_and_matches_the_merged_export_and_our_forward(exported):
    base_dir, adapter_dir, merged_dir = exported
    peft_model = PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval()
    # PEFT took every tensor of the file, by name, with its values (on a name it does not
    # know it only warns, and that module's adapter silently keeps its init).
    file = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
    loaded = {k: v.numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert sorted(loaded) == sorted(file) and len(file) == 2 * 2 * len(TARGETS)
    for key, value in file.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    conf = peft_model.peft_config["default"]
    assert (conf.r, conf.lora_alpha, conf.use_rslora) == (4, 8.0, False)
    assert set(conf.target_modules) == {module.split(".")[-1] for module, _ in TARGETS.values()}

    via_peft = logits(peft_model)
    with peft_model.disable_adapter():
        via_base = logits(peft_model)
    ours = load_model(base_dir)
    adapters, _, scale = load_adapters(adapter_dir, ours.cfg)
    via_ours = np.asarray(forward(jax.tree.map(jnp.asarray, ours.params), jnp.asarray(SEQ),
                                  ours.cfg, lora=(jax.tree.map(jnp.asarray, adapters), scale))[0])
    assert_same_model(logits(hf_model(merged_dir)), via_peft, via_base, "merged export")
    assert_same_model(via_ours[..., :VOCAB], via_peft, via_base, "our forward")


def test_a_peft_adapter_merges_into_peft_logits_and_special_options_are_refused(
        exported, tmp_path, capsys):
    """rsLoRA scaling (alpha / sqrt(r)), three of the modules, A and B both random."""
    base_dir = exported[0]
    peft_model = get_peft_model(hf_model(base_dir), LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
        target_modules=["k_proj", "o_proj", "gate_proj"])).eval()
    adapter = str(tmp_path / "peft_adapter")
    peft_model.save_pretrained(adapter)
    assert export(base_dir, adapter, str(tmp_path / "merged")) == 0
    via_peft = logits(peft_model)
    with peft_model.disable_adapter():
        via_base = logits(peft_model)
    assert_same_model(logits(hf_model(tmp_path / "merged")), via_peft, via_base, "merged")

    conf_file = os.path.join(adapter, CONFIG_FILE)
    conf = json.load(open(conf_file, encoding="utf-8"))
    capsys.readouterr()  # transformers' loading progress
    for key, value in (("alpha_pattern", {"k_proj": 16}), ("use_dora", True)):
        with open(conf_file, "w", encoding="utf-8") as f:
            json.dump({**conf, key: value}, f)
        out = tmp_path / f"refused_{key}"
        assert export(base_dir, adapter, str(out)) == 2
        err = capsys.readouterr().err
        assert "only plain LoRA adapters are supported" in err and f"sets {key}" in err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
