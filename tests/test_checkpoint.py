"""Native checkpoints and sharded loading: the blockwise layout map, Orbax save/restore
(bitwise, any mesh), HF loads straight into shardings, atomic writes, bad checkpoints."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import atomic
from meditron_jax.io import checkpoint, hf_io, tensor_blocks
from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.io.hf_keys import expected_hf_keys, hf_shape, params_from_hf, rules
from meditron_jax.io.loading import load_model
from meditron_jax.model import abstract_params
from sharding import TRAIN_RULES, make_mesh, param_shardings
from tests import hf_fixtures

# device count -> mesh spec
MESHES = {1: "fsdp=1", 2: "tensor=2", 4: "fsdp=2,tensor=2", 8: "fsdp=4,tensor=2"}


def _mesh(n: int):
    return make_mesh(MESHES[n], devices=jax.devices()[:n])


def _equal_trees(a, b) -> bool:
    pairs = jax.tree.leaves(jax.tree.map(
        lambda x, y: x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), a, b))
    return bool(pairs) and all(pairs)


def _random_params(cfg: LlamaConfig, dtype) -> dict:
    """Numpy params of the model's shapes (no JAX compiles: this file never jits)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: (0.25 * rng.standard_normal(a.shape)).astype(dtype),
                        abstract_params(cfg))


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """A multi-shard HF snapshot and its state dict (the independent reference)."""
    path = tmp_path_factory.mktemp("hf_sharded")
    model = hf_fixtures.make_hf_model(seed=3)
    model.save_pretrained(path, max_shard_size="200KB")
    assert os.path.exists(path / hf_io.INDEX_FILE)
    cfg = LlamaConfig.from_hf(str(path))
    return str(path), cfg, params_from_hf(hf_fixtures.state_dict_numpy(model), cfg)


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory):
    """Random bf16 params saved from an 8-device mesh (fsdp=4, tensor=2)."""
    cfg = LlamaConfig.from_hf(dict(hf_fixtures.TINY_HF))
    params = _random_params(cfg, jnp.bfloat16)
    mesh = _mesh(8)
    sharded = jax.device_put(params, param_shardings(cfg, mesh, TRAIN_RULES))
    path = str(tmp_path_factory.mktemp("native") / "ckpt")
    checkpoint.save_params(path, cfg, sharded)
    return path, cfg, params


# ---- the blockwise layout map -------------------------------------------------------------
def test_layout_map_agrees_with_key_map_transforms():
    """Reading any block through ``hf_dims`` equals the key map's own transform cut to
    that block, and writing back gives the HF rows: the declared layout and the
    functions describe the same map."""
    cfg = LlamaConfig.from_hf(dict(hf_fixtures.TINY_HF))
    rng = np.random.default_rng(0)
    plans = {p.path: p for p in tensor_blocks.plan(cfg, block_bytes=1024)}
    for rule in rules(cfg):
        p = plans[rule.ours]
        hf = rng.standard_normal(hf_shape(rule, cfg)).astype(np.float32)
        ours = rule.to_ours(hf, cfg)
        assert ours.shape == p.layer_shape
        read = lambda idx: hf[idx]  # noqa: E731
        full = tuple(slice(None) for _ in ours.shape)
        np.testing.assert_array_equal(tensor_blocks.read_ours(read, rule.hf_dims, ours.shape, full), ours)
        # an arbitrary sub-block in every dim (a shard of a sharded load)
        sub = tuple(slice(n // 4, n - n // 3) for n in ours.shape)
        np.testing.assert_array_equal(tensor_blocks.read_ours(read, rule.hf_dims, ours.shape, sub), ours[sub])
        # the plan's blocks partition the block axis and map back to contiguous HF rows
        rows = [tensor_blocks.hf_from_ours(ours[b], rule.hf_dims) for b in p.layer_blocks()]
        assert len(rows) > 1 or ours.size * 4 <= 1024
        np.testing.assert_array_equal(np.concatenate(rows, axis=0), hf)


def test_block_plan_chunks_tile_the_array():
    cfg = LlamaConfig.from_hf(dict(hf_fixtures.TINY_HF))
    for p in tensor_blocks.plan(cfg, block_bytes=3000):
        covered = np.zeros(p.shape, np.int32)
        for layer in range(p.num_tensors):
            for index in p.blocks(layer):
                covered[index] += 1
                assert all(s.stop - (s.start or 0) <= c for s, c in zip(index, p.chunk_shape)
                           if s.stop is not None)
        assert (covered == 1).all(), p.path


# ---- HF snapshot loads --------------------------------------------------------------------
@pytest.mark.parametrize("n", sorted(MESHES))
def test_hf_load_lands_in_target_shardings(hf_sharded, n, monkeypatch):
    path, cfg, ref = hf_sharded
    mesh = _mesh(n)
    reads = []
    original = hf_io.HFSnapshot.read
    monkeypatch.setattr(hf_io.HFSnapshot, "read",
                        lambda self, p, index: reads.append((p, index)) or original(self, p, index))
    model = load_model(path, shardings=lambda c: param_shardings(c, mesh, TRAIN_RULES))
    want = param_shardings(cfg, mesh, TRAIN_RULES)
    assert model.kind == "hf"
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, model.params, want)))
    assert _equal_trees(model.params, jax.tree.map(jnp.asarray, ref))
    # each read is one shard's slice, never more than the shard
    for p, index in reads:
        sharding = want
        for name in p.path:
            sharding = sharding[name]
        shard_shape = sharding.shard_shape(p.shape)
        got = tuple(len(range(*s.indices(d))) for s, d in zip(index, p.shape))
        assert got == shard_shape


def test_hf_load_casts_dtype(hf_sharded):
    path, _, ref = hf_sharded
    model = load_model(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(model.params["layers"]["q"]),
                                  ref["layers"]["q"].astype(jnp.bfloat16))


# ---- native save / restore ----------------------------------------------------------------
@pytest.mark.parametrize("n", sorted(MESHES))
def test_native_restore_onto_any_mesh(saved_on_8, n):
    """Saved from 8 devices, restored on 1, 2, 4 and 8: identical arrays, each in the
    expected sharding."""
    path, cfg, params = saved_on_8
    mesh = _mesh(n)
    model = load_model(path, shardings=lambda c: param_shardings(c, mesh, TRAIN_RULES))
    assert model.kind == "native" and model.cfg == cfg
    want = param_shardings(cfg, mesh, TRAIN_RULES)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, model.params, want)))
    assert _equal_trees(model.params, params)


def test_native_restore_casts_and_defaults_to_one_device(saved_on_8):
    path, _, params = saved_on_8
    cfg, restored = checkpoint.restore_params(path, dtype=jnp.float32)
    leaf = restored["layers"]["gate"]
    assert leaf.dtype == jnp.float32 and len(leaf.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(params["layers"]["gate"], np.float32))


def test_native_params_dir_is_plain_orbax(saved_on_8):
    """Readable by Orbax alone, without this package's handlers."""
    import orbax.checkpoint as ocp
    path, _, params = saved_on_8
    tree = ocp.PyTreeCheckpointer().metadata(os.path.join(path, "params")).item_metadata.tree
    assert tuple(tree["layers"]["q"].shape) == params["layers"]["q"].shape


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return os.fspath(dst)


def test_restore_rejects_bad_checkpoints(saved_on_8, tmp_path):
    """Edited after saving: refused by the checksums first; past them (``verify=False``)
    each damage still has its own one-line error."""
    path, _, _ = saved_on_8
    # config that does not match the saved params
    bad = _copy(path, tmp_path / "mismatch")
    meta = json.load(open(os.path.join(bad, checkpoint.CONFIG_FILE)))
    meta["config"]["intermediate_size"] = 96
    json.dump(meta, open(os.path.join(bad, checkpoint.CONFIG_FILE), "w"))
    with pytest.raises(UserError, match=r"meditron_config\.json: \d+ bytes where checksums"):
        load_model(bad)
    with pytest.raises(UserError, match=r"parameter layers\.down has shape .* expected"):
        load_model(bad, verify=False)
    # params/ missing (an incomplete copy)
    bad = _copy(path, tmp_path / "noparams")
    shutil.rmtree(os.path.join(bad, "params"))
    with pytest.raises(UserError, match="checkpoint is incomplete"):
        load_model(bad)
    # unknown format version / malformed JSON
    bad = _copy(path, tmp_path / "version")
    meta["version"] = 99
    json.dump(meta, open(os.path.join(bad, checkpoint.CONFIG_FILE), "w"))
    with pytest.raises(UserError, match="format version 99"):
        load_model(bad, verify=False)
    with open(os.path.join(bad, checkpoint.CONFIG_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="malformed JSON"):
        load_model(bad)


def test_save_params_rejects_wrong_tree(tmp_path):
    cfg = LlamaConfig.from_hf(dict(hf_fixtures.TINY_HF))
    params = _random_params(cfg, np.float32)
    params["layers"]["q"] = params["layers"]["q"][:, :, :2]
    with pytest.raises(UserError, match=r"layers\.q has shape"):
        checkpoint.save_params(tmp_path / "x", cfg, params)
    assert not os.path.exists(tmp_path / "x")


def test_native_reader_reads_blocks(saved_on_8):
    path, cfg, params = saved_on_8
    reader = checkpoint.NativeReader(path)
    p = next(p for p in tensor_blocks.plan(cfg) if p.path == ("layers", "o"))
    index = (slice(1, 2), slice(1, 3), slice(None), slice(5, 9))
    np.testing.assert_array_equal(reader.read(p, index), np.asarray(params["layers"]["o"])[index])
    assert reader.dtype_of(p) == jnp.bfloat16


# ---- atomic writes ------------------------------------------------------------------------
def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert json.load(open(target)) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_staged_dir_replaces_only_when_complete(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(dest) as staging:
            open(os.path.join(staging, "new"), "w").write("half")
            raise RuntimeError("failed midway")
    assert os.listdir(dest) == ["old"] and sorted(os.listdir(tmp_path)) == ["ckpt"]
    with atomic.staged_dir(dest) as staging:
        open(os.path.join(staging, "new"), "w").write("done")
    assert os.listdir(dest) == ["new"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_staged_dir_recovers_a_swap_cut_by_a_crash(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE the swap is two renames; a crash between them leaves
    only ``.ckpt.old``, which the next writer puts back before anything else."""
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old").write_text("good")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)
    monkeypatch.setattr(atomic.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic.staged_dir(dest) as staging:
            open(os.path.join(staging, "new"), "w").write("done")
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not dest.exists() and (tmp_path / ".ckpt.old" / "old").exists()
    atomic.recover(dest)
    assert (dest / "old").read_text() == "good"


def test_expected_keys_cover_every_plan():
    cfg = LlamaConfig.from_hf(dict(hf_fixtures.TINY_HF))
    names = {n for n, _, _ in tensor_blocks.iter_hf_tensors(tensor_blocks.plan(cfg), cfg.num_hidden_layers)}
    assert names == set(expected_hf_keys(cfg))


def test_staged_dir_multi_process_roles(tmp_path):
    """Every process writes into the same staging directory; only the lead creates,
    swaps and cleans it, and all meet at the barriers."""
    dest, calls = tmp_path / "ckpt", []
    with atomic.staged_dir(dest, lead=True, barrier=calls.append) as staging:
        with atomic.staged_dir(dest, lead=False, barrier=calls.append) as other:
            assert other == staging and os.path.isdir(staging)
            open(os.path.join(other, "shard1"), "w").write("from process 1")
        assert not dest.exists()  # a non-lead never swaps
        open(os.path.join(staging, "shard0"), "w").write("from process 0")
    assert sorted(os.listdir(dest)) == ["shard0", "shard1"]
    assert [c.split(":")[1] for c in calls] == ["start", "start", "written", "done", "written", "done"]


def test_export_of_a_trained_checkpoint_matches_the_key_map(saved_on_8, tmp_path):
    """A checkpoint saved from sharded jax Arrays (Orbax's own chunking, not ours)
    exports to exactly what the in-memory key map gives."""
    from safetensors.numpy import load_file
    from meditron_jax.io.convert import export_to_hf
    from meditron_jax.io.hf_keys import hf_from_params
    path, cfg, params = saved_on_8
    export_to_hf(path, str(tmp_path / "hf"), quiet=True)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = hf_from_params(jax.tree.map(np.asarray, params), cfg)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].tobytes() == w.tobytes(), name
