"""Tied heads and a vocabulary our layout pads: the checkpoint side (issue 16, items 3-4).

A tied checkpoint loads with or without a stored ``lm_head.weight`` (a copy equal to the
embedding is accepted, compared a block of rows at a time; a different one is refused
by name), gives transformers' logits, and exports what transformers' ``save_pretrained``
writes. The vocabulary here is 257 (256 + one added pad token, as Llama-3's 128257):
our layout pads it to 384 (``model.padded_vocab_size``), so the native checkpoint holds
zero rows past 257, while every HF tensor -- read, exported, or a device's shard of a
sharded load -- holds exactly the 257 true rows.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sharding
from meditron_jax.io import checkpoint, hf_io, tensor_blocks
from cli import main as cli
from meditron_jax.model.config import LlamaConfig
from meditron_jax.io.convert import convert_to_native, export_to_hf
from meditron_jax.errors import UserError
from meditron_jax.io.hf_keys import hf_from_params, params_from_hf
from meditron_jax.io.loading import load_model
from meditron_jax.model import forward, padded_vocab_size
from tests import hf_fixtures

VOCAB, PADDED = 257, 384
TOKENS = np.array([[1, 256, 5, 200, 17, 255, 3, 128, 64, 250],
                   [2, 9, 256, 31, 7, 99, 180, 42, 11, 0]])
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
_logits = jax.jit(lambda params, tokens, cfg: forward(params, tokens, cfg)[0], static_argnums=2)


def _logit_diff(path, reference, shardings=None) -> float:
    model = load_model(path, shardings=shardings)
    ours = np.asarray(_logits(model.params, TOKENS, model.cfg))
    return float(np.abs(ours - hf_fixtures.torch_logits(reference, TOKENS)).max())


def _with_head(src, dest, head=None) -> str:
    """A copy of tied snapshot ``src`` whose model.safetensors also stores lm_head.weight
    (the embedding unless ``head`` is given), as some exporters write tied models."""
    shutil.copytree(src, dest)
    file = os.path.join(dest, "model.safetensors")
    tensors = load_file(file)
    tensors[HEAD] = tensors[EMBED].copy() if head is None else head
    save_file(tensors, file, metadata={"format": "pt"})
    return str(dest)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A random tied model saved by transformers (no lm_head.weight), the same snapshot
    with lm_head.weight stored, and its native conversion."""
    root = tmp_path_factory.mktemp("tied")
    model = hf_fixtures.make_hf_model(vocab_size=VOCAB, tie_word_embeddings=True)
    model.save_pretrained(root / "plain")
    assert HEAD not in load_file(root / "plain" / "model.safetensors")  # transformers' way
    stored = _with_head(root / "plain", root / "stored")
    native = str(root / "native")
    assert cli.main(["convert", "--model", stored, "--out", native, "--quiet"]) == 0
    return model, str(root / "plain"), stored, native


def test_tied_model_loads_with_or_without_stored_head_and_matches_transformers(tied):
    model, plain, stored, native = tied
    for path in (plain, stored, native):
        assert _logit_diff(path, model) < 1e-4, path
    params = load_model(native).params
    assert "lm_head" not in params and params["embed"].shape == (PADDED, 64)
    np.testing.assert_array_equal(np.asarray(params["embed"])[:VOCAB],
                                  model.model.embed_tokens.weight.detach().numpy())
    assert not np.asarray(params["embed"])[VOCAB:].any()


def test_stored_head_is_compared_a_block_at_a_time(tied, tmp_path, monkeypatch):
    """4-row blocks (1 KiB): every read is one block, all 2 x 257 rows are compared, and
    a copy differing in its last row only is refused by name."""
    _, _, stored, _ = tied
    monkeypatch.setattr(hf_io, "BLOCK_BYTES", 1024)
    reads, real = [], hf_io._read_rows

    def spy(t, index):
        out = real(t, index)
        reads.append(out.shape[0])
        return out
    monkeypatch.setattr(hf_io, "_read_rows", spy)
    assert HEAD not in hf_io.HFSnapshot.open(stored).tensors
    assert max(reads) == 4 and sum(reads) == 2 * VOCAB

    head = load_file(os.path.join(stored, "model.safetensors"))[HEAD]
    head[-1, 0] += 1e-3
    bad = _with_head(tied[1], tmp_path / "bad", head)
    with pytest.raises(UserError, match=rf"model\.safetensors: tensor lm_head\.weight differs "
                                        rf"from model\.embed_tokens\.weight.*tie_word_embeddings"):
        hf_io.HFSnapshot.open(bad)


def _untie(src, dest) -> str:
    """A copy of tied snapshot ``src`` whose config.json forgets tie_word_embeddings."""
    shutil.copytree(src, dest)
    with open(os.path.join(dest, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(dict(hf, tie_word_embeddings=False), f)
    return str(dest)


def test_bad_tied_checkpoints_are_one_line_and_nothing_written(tied, tmp_path, capsys):
    model, plain, _, _ = tied
    embed = load_file(os.path.join(plain, "model.safetensors"))[EMBED]
    cases = {
        "differs": (lambda d: _with_head(plain, d, embed * 2),
                    r"tensor lm_head\.weight differs from model\.embed_tokens\.weight"),
        "shape": (lambda d: _with_head(plain, d, embed[:-1].copy()),
                  r"tensor lm_head\.weight has shape \(256, 64\), expected \(257, 64\)"),
        "untied_config": (lambda d: _untie(plain, d), r"missing tensor\(s\) lm_head\.weight "
                          r"\(a tied head\? then config\.json needs tie_word_embeddings: true\)"),
    }
    for name, (make, message) in cases.items():
        src = make(tmp_path / name)
        out = tmp_path / f"{name}_out"
        assert cli.main(["convert", "--model", src, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err, err
        assert re.search(message, err), err
        assert not out.exists()
    # the in-memory path: transformers' own state_dict() holds the (shared) head
    cfg = LlamaConfig.from_hf(plain)
    state = hf_fixtures.state_dict_numpy(model)
    assert HEAD in state and "lm_head" not in params_from_hf(state, cfg)
    state[HEAD] = state[HEAD] + 1
    with pytest.raises(UserError, match=r"state dict: tensor lm_head\.weight differs"):
        params_from_hf(state, cfg)


def test_tied_export_is_what_transformers_saves(tied, tmp_path):
    from transformers import AutoModelForCausalLM
    model, plain, _, native = tied
    out = tmp_path / "hf"
    assert cli.main(["export", "--model", native, "--out", str(out), "--quiet"]) == 0
    got = load_file(out / "model.safetensors")
    want = load_file(os.path.join(plain, "model.safetensors"))
    assert sorted(got) == sorted(want) and HEAD not in got
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert json.load(open(out / "config.json"))["tie_word_embeddings"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    diff = hf_fixtures.torch_logits(reloaded, TOKENS) - hf_fixtures.torch_logits(model, TOKENS)
    assert np.abs(diff).max() == 0.0


# ---- an untied head, vocabulary 257 ------------------------------------------------------
@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied")
    model = hf_fixtures.make_hf_model(vocab_size=VOCAB, seed=1)
    model.save_pretrained(path)
    return model, str(path)


def test_native_checkpoint_pads_and_export_trims_in_small_blocks(untied, tmp_path):
    """16-row blocks: one straddles row 257, seven lie wholly in the padding."""
    model, src = untied
    cfg = LlamaConfig.from_hf(src)
    assert cfg.vocab_size == VOCAB and padded_vocab_size(cfg) == PADDED
    embed_plan = next(p for p in tensor_blocks.plan(cfg, 4096) if p.path == ("embed",))
    assert len(embed_plan.layer_blocks()) == 24 and len(embed_plan.hf_blocks()) == 17
    assert embed_plan.hf_blocks()[-1][0] == slice(256, 257)  # export reads no padding
    native, out = str(tmp_path / "native"), str(tmp_path / "hf")
    convert_to_native(src, native, quiet=True, block_bytes=4096)
    _, params = checkpoint.restore_params(native)
    hf = load_file(os.path.join(src, "model.safetensors"))
    for ours, theirs in ((np.asarray(params["embed"]), hf[EMBED]),
                         (np.asarray(params["lm_head"]).T, hf[HEAD])):
        assert ours.shape == (PADDED, 64) and not ours[VOCAB:].any()
        np.testing.assert_array_equal(ours[:VOCAB], theirs)
    export_to_hf(native, out, quiet=True, block_bytes=4096)
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(hf)
    for name in hf:
        assert exported[name].tobytes() == hf[name].tobytes(), name
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == VOCAB
    # the in-memory key map pads and trims the same way
    padded = params_from_hf(hf, cfg)
    np.testing.assert_array_equal(padded["lm_head"], np.asarray(params["lm_head"]))
    back = hf_from_params(padded, cfg)
    assert all(back[n].tobytes() == hf[n].tobytes() for n in hf)
    assert _logit_diff(native, model) < 1e-4


def test_each_device_reads_its_shard_of_the_padded_table(untied):
    """fsdp=2 x tensor=4: vocab shards of 96 rows; [192, 288) holds 65 real rows and
    [288, 384) none; the embed dim is cut in two, so reads take column slices too."""
    model, src = untied
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    shardings = lambda cfg: sharding.param_shardings(cfg, mesh, sharding.TRAIN_RULES)  # noqa: E731
    loaded = load_model(src, shardings=shardings)
    hf = hf_fixtures.state_dict_numpy(model)
    want = {"embed": np.pad(hf[EMBED], ((0, PADDED - VOCAB), (0, 0))),
            "lm_head": np.pad(hf[HEAD], ((0, PADDED - VOCAB), (0, 0))).T}
    for name, full in want.items():
        array = loaded.params[name]
        assert array.shape == full.shape and len(array.sharding.device_set) == 8
        vocab_dim = 0 if name == "embed" else 1
        starts = {shard.index[vocab_dim].start or 0 for shard in array.addressable_shards}
        assert starts == {0, 96, 192, 288}
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    assert _logit_diff(src, model, shardings) < 1e-4
