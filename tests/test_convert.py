"""``convert`` / ``export``: HF -> native -> HF bitwise, transformers reloads the export
with the same logits, and every bad input is one clear line that leaves an existing
good checkpoint at the destination untouched."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import types

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from meditron_jax.io import checkpoint, hf_io
from cli import main as cli
from meditron_jax.io.convert import convert_to_native, export_to_hf
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from tests import hf_fixtures


def _tokenizer_files(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)


@pytest.fixture(scope="module")
def hf_single(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_single")
    model = hf_fixtures.make_hf_model(seed=0)
    model.save_pretrained(path)
    _tokenizer_files(path)
    return str(path), model


@pytest.fixture(scope="module")
def hf_multi(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_multi")
    hf_fixtures.make_hf_snapshot(path, max_shard_size="200KB", seed=1)
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) > 1
    return str(path)


@pytest.fixture(scope="module")
def good_native(hf_single, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good") / "ckpt")
    convert_to_native(hf_single[0], out, quiet=True)
    return out


def _run(*argv) -> int:
    return cli.main([*argv, "--quiet"])


def _tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_bitwise(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


def tree_digest(path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


# ---- round trips --------------------------------------------------------------------------
def test_roundtrip_single_file_bitwise_and_transformers_logits(hf_single, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM
    src, model = hf_single
    assert _run("convert", "--model", src, "--out", str(tmp_path / "native")) == 0
    assert _run("export", "--model", str(tmp_path / "native"), "--out", str(tmp_path / "hf")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("exported 21 tensors") and "peak RSS" in lines[-1]
    assert os.listdir(tmp_path / "hf").count("model.safetensors") == 1
    _assert_bitwise(_tensors(src), _tensors(tmp_path / "hf"))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
    diff = np.abs(hf_fixtures.torch_logits(reloaded, tokens) - hf_fixtures.torch_logits(model, tokens))
    assert diff.max() <= 1e-5

    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))  # transformers-4 spelling
    assert hf_cfg["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" in hf_cfg
    assert "rope_parameters" not in hf_cfg and hf_cfg["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        for out in ("native", "hf"):
            assert open(tmp_path / out / name, "rb").read() == open(os.path.join(src, name), "rb").read()
    loaded = load_model(tmp_path / "native")
    assert loaded.tokenizer.encode("w1 w2") == [1, 4, 5]


def test_roundtrip_multi_shard_bitwise_in_small_blocks(hf_multi, tmp_path):
    """Blocks of 2 KB cut every tensor into many pieces, through both directions."""
    native, out = str(tmp_path / "native"), str(tmp_path / "hf")
    convert_to_native(hf_multi, native, quiet=True, block_bytes=2048)
    export_to_hf(native, out, max_shard_size="150KB", quiet=True, block_bytes=2048)
    index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(
        os.path.basename(f) for f in glob.glob(os.path.join(out, "*.safetensors")))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(out).values())
    _assert_bitwise(_tensors(hf_multi), _tensors(out))
    assert not os.path.exists(os.path.join(native, "tokenizer.json"))  # none to copy: still fine


def test_bfloat16_snapshot_keeps_its_dtype(tmp_path):
    import torch
    src = tmp_path / "bf16"
    hf_fixtures.make_hf_model(seed=2).to(torch.bfloat16).save_pretrained(src)
    assert _run("convert", "--model", str(src), "--out", str(tmp_path / "native")) == 0
    reader = checkpoint.NativeReader(tmp_path / "native")
    assert {str(d) for _, d in reader.stored.values()} == {"bfloat16"}
    assert _run("export", "--model", str(tmp_path / "native"), "--out", str(tmp_path / "hf")) == 0
    _assert_bitwise(_tensors(src), _tensors(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"


def test_dtype_cast_and_either_kind_as_source(hf_single, hf_multi, tmp_path):
    import ml_dtypes
    src, _ = hf_single
    native = str(tmp_path / "native")
    assert _run("convert", "--model", src, "--out", native, "--dtype", "bfloat16") == 0
    assert _run("export", "--model", native, "--out", str(tmp_path / "hf16")) == 0
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(src).items()}
    _assert_bitwise(want, _tensors(tmp_path / "hf16"))
    # native -> native (cast back up) and HF -> HF (re-shard into one file)
    assert _run("convert", "--model", native, "--out", str(tmp_path / "n32"), "--dtype", "float32") == 0
    _, params = checkpoint.restore_params(tmp_path / "n32")
    np.testing.assert_array_equal(np.asarray(params["embed"]), want["model.embed_tokens.weight"].astype(np.float32))
    assert _run("export", "--model", hf_multi, "--out", str(tmp_path / "one")) == 0
    assert os.listdir(tmp_path / "one").count("model.safetensors") == 1
    _assert_bitwise(_tensors(hf_multi), _tensors(tmp_path / "one"))


def test_export_merges_lora(good_native, tmp_path, monkeypatch):
    seen = {}

    def load_and_merge(params, cfg, lora_dir):
        seen["dir"] = lora_dir
        params["final_norm"] = params["final_norm"] + np.float32(1.0)
        return params
    monkeypatch.setitem(sys.modules, "meditron_jax.model.lora", types.SimpleNamespace(load_and_merge=load_and_merge))
    lora = tmp_path / "adapter"
    lora.mkdir()
    assert _run("export", "--model", good_native, "--out", str(tmp_path / "hf"), "--lora", str(lora)) == 0
    assert seen["dir"] == str(lora)
    _, params = checkpoint.restore_params(good_native)
    np.testing.assert_array_equal(_tensors(tmp_path / "hf")["model.norm.weight"],
                                  np.asarray(params["final_norm"]) + 1)


def test_help_shows_defaults(capsys):
    for command, flag in (("convert", "--dtype"), ("export", "--max-shard-size")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert flag in text and "default" in text
    assert "(default: 5GB)" in " ".join(text.split())


# ---- bad input ----------------------------------------------------------------------------
def _rewrite(path, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _truncate(path):
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, os.path.getsize(file) // 2)


def _edit_config(**changes):
    def edit(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg.update(changes)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return edit


def _escape_index(path):
    index_file = os.path.join(path, hf_io.INDEX_FILE)
    index = json.load(open(index_file))
    name = next(iter(index["weight_map"]))
    shutil.copyfile(os.path.join(path, index["weight_map"][name]), os.path.join(path, "..", "x.safetensors"))
    index["weight_map"][name] = "../x.safetensors"
    json.dump(index, open(index_file, "w"))


def _drop_shard(path):
    index = json.load(open(os.path.join(path, hf_io.INDEX_FILE)))
    os.remove(os.path.join(path, sorted(set(index["weight_map"].values()))[1]))


def _pickled_only(path):
    import torch
    tensors = load_file(os.path.join(path, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))


BAD = {
    "truncated": ("single", _truncate, "truncated or corrupt"),
    "missing_shard": ("multi", _drop_shard, r"shard model-00002-of-\d+\.safetensors .* is missing"),
    "index_escapes": ("multi", _escape_index, "points outside the checkpoint directory"),
    "missing_tensor": ("single", lambda p: _rewrite(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"),
    "extra_tensor": ("single", lambda p: _rewrite(p, lambda t: t.update(
        {"model.layers.0.mlp.extra.weight": np.zeros(4, np.float32)})),
                     r"unexpected tensor\(s\) model\.layers\.0\.mlp\.extra\.weight"),
    "wrong_shape": ("single", lambda p: _rewrite(p, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.ascontiguousarray(t["model.layers.0.mlp.down_proj.weight"].T)})),
                    r"down_proj\.weight has shape \(128, 64\), expected \(64, 128\)"),
    "wrong_dtype": ("single", lambda p: _rewrite(p, lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].astype(np.int32)})),
                    "model.norm.weight has dtype I32"),
    "config_hidden_size": ("single", _edit_config(hidden_size=32, head_dim=8),
                           r"has shape .* expected .* from config\.json"),
    "config_layers": ("single", _edit_config(num_hidden_layers=3), r"missing tensor\(s\) model\.layers\.2\."),
    "pickled_only": ("single", _pickled_only, r"only pickled PyTorch weights \(pytorch_model\.bin\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_destination_survives(case, hf_single, hf_multi, good_native,
                                                        tmp_path, capsys):
    kind, corrupt, message = BAD[case]
    src = shutil.copytree(hf_single[0] if kind == "single" else hf_multi, tmp_path / "src")
    corrupt(str(src))
    dest = shutil.copytree(good_native, tmp_path / "dest")
    before = tree_digest(dest)
    assert _run("convert", "--model", str(src), "--out", str(dest), "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("meditron-jax convert: error:"), err
    assert re.search(message, err), err
    assert tree_digest(dest) == before
    assert sorted(os.listdir(tmp_path)) == sorted(["src", "dest"] + (["x.safetensors"] if case == "index_escapes" else []))


def test_failure_midway_leaves_destination_and_no_partial(hf_single, good_native, tmp_path, monkeypatch):
    dest = shutil.copytree(good_native, tmp_path / "dest")
    before = tree_digest(dest)
    calls = []
    real = hf_io.HFSnapshot.read

    def flaky(self, p, index):
        calls.append(p)
        if len(calls) == 6:
            raise OSError("disk read failed")
        return real(self, p, index)
    monkeypatch.setattr(hf_io.HFSnapshot, "read", flaky)
    with pytest.raises(UserError, match="disk read failed"):  # one line, not a traceback
        convert_to_native(hf_single[0], str(dest), overwrite=True, quiet=True)
    with pytest.raises(UserError, match="disk read failed"):
        calls.clear()
        export_to_hf(hf_single[0], str(tmp_path / "hf"), quiet=True)
    assert tree_digest(dest) == before and sorted(os.listdir(tmp_path)) == ["dest"]


def test_destination_guards(hf_single, good_native, tmp_path, capsys):
    src = hf_single[0]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    cases = [
        (["convert", "--model", src, "--out", str(tmp_path / "notes")], "is not a native checkpoint"),
        (["convert", "--model", src, "--out", good_native], "pass --overwrite"),
        (["export", "--model", src, "--out", src, "--overwrite"], "is the --model directory"),
        (["export", "--model", good_native, "--out", str(tmp_path / "x"), "--max-shard-size", "lots"],
         "expected a size like 5GB"),
        (["export", "--model", good_native, "--out", str(tmp_path / "x"), "--lora", str(tmp_path / "none")],
         "--lora .*: no such directory"),
        (["convert", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "no such directory"),
    ]
    for argv, message in cases:
        assert _run(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
