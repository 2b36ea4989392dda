"""Mesh specs, rule tables and their checks, derived shardings, sharded init, and the
multi-process start-up's argument handling (on 8 fake CPU devices)."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from meditron_jax.model.config import preset
from meditron_jax.errors import UserError
from meditron_jax.model.kvcache import KVCache
from meditron_jax.model.lora import LoraConfig
from meditron_jax.model import (abstract_params, forward, init_params, is_spec, padded_vocab_size,
                                param_specs)
from sharding import (INFER_RULES, LOGICAL_NAMES, PRESETS, TRAIN_RULES, Rules,
                      add_distributed_arguments, cache_heads, cache_shardings, check_batch,
                      check_model_fits, derived_shardings, initialize_distributed, make_mesh,
                      param_shardings, parse_mesh_spec, place, sharded_initializer)
from sharding.distributed import initialize_from_args
from train.step import abstract_state, state_shardings

TINY = preset("tiny")
BIG = preset("meditron3-8b")


# ---- mesh specs ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, sizes", [
    ("data=2,fsdp=2,tensor=2", (2, 2, 2)),
    ("data=2,fsdp=-1", (2, 4, 1)),
    ("tensor=-1", (1, 1, 8)),
    ("", (1, 8, 1)),
    (" fsdp = 4 ", (1, 4, 1)),
    ({"tensor": 2, "fsdp": -1}, (1, 4, 2)),
])
def test_parse_mesh_spec(spec, sizes):
    assert tuple(parse_mesh_spec(spec, 8).values()) == sizes


@pytest.mark.parametrize("spec, message", [
    ("data=16", "needs 16 devices but only 8"),
    ("data=4,tensor=4", "needs 16 devices but only 8"),
    ("data=3,fsdp=-1", "not divisible by the fixed axes' product 3"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("pipeline=2", "AXIS in data, fsdp, tensor"),
    ("data", "AXIS in data, fsdp, tensor"),
    ("data=two", "must be an integer"),
    ("data=2,data=2", "given twice"),
    ("data=0", "sizes must be positive"),
    ({"data": "2"}, "sizes must be positive"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_mesh_spec(spec, 8)


def test_make_mesh_is_auto_and_uses_every_device():
    mesh = make_mesh("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert make_mesh("tensor=2", devices=jax.devices()[2:]).devices.size == 2


# ---- rule tables -----------------------------------------------------------------------
def used_logical_names() -> set[str]:
    """Every logical name the model uses: parameters, KV cache, and the activation
    constraints it asks for during a forward pass with and without a cache."""
    names = set()
    for spec in jax.tree.leaves(param_specs(TINY), is_leaf=is_spec):
        names.update(spec.axes)
    for axes in jax.tree.leaves(KVCache.logical_axes(), is_leaf=lambda x: isinstance(x, tuple)):
        names.update(axes)

    def record(x, axes):
        names.update(a for a in axes if a is not None)
        return x
    params = abstract_params(TINY)
    tokens = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    jax.eval_shape(lambda p, t: forward(p, t, TINY, constrain=record), params, tokens)
    cache = jax.eval_shape(lambda: KVCache.init(TINY, 2, 8))
    jax.eval_shape(lambda p, t, c: forward(p, t, TINY, cache=c, constrain=record),
                   params, tokens, cache)
    return names


def test_every_logical_name_has_exactly_one_rule():
    used = used_logical_names()
    assert {"batch", "seq", "vocab", "embed", "heads", "kv_heads", "cache_heads", "mlp",
            "layers"} <= used
    assert used <= set(LOGICAL_NAMES), f"names without a rule: {used - set(LOGICAL_NAMES)}"
    for rules in PRESETS.values():
        assert set(rules.table) == set(LOGICAL_NAMES)


def test_a_table_missing_a_name_or_naming_a_bad_axis_is_refused():
    table = dict(TRAIN_RULES.table)
    del table["mlp"]
    with pytest.raises(ValueError, match=r"missing \['mlp'\]"):
        Rules("broken", table)
    with pytest.raises(ValueError, match="tuple of distinct mesh axes"):
        Rules("broken", {**TRAIN_RULES.table, "mlp": ("model",)})
    with pytest.raises(UserError, match="no rule for logical axis 'experts'"):
        TRAIN_RULES.spec(("experts",))


def test_two_dims_of_one_array_on_one_mesh_axis_is_an_error_on_any_mesh():
    rules = Rules("clash", {**TRAIN_RULES.table, "mlp": ("fsdp",)})
    for spec in ("fsdp=8", "data=8"):  # also when fsdp has size 1 on this mesh
        with pytest.raises(UserError, match="'mlp' and 'embed' of one array .* mesh axis 'fsdp'"):
            param_shardings(TINY, make_mesh(spec), rules)


def test_specs_drop_size_one_axes():
    mesh = make_mesh("fsdp=8")
    assert TRAIN_RULES.spec(("layers", "embed", "heads", "head_dim"), mesh) == P(None, "fsdp")
    assert TRAIN_RULES.spec(("batch", "seq"), mesh) == P("fsdp")
    assert TRAIN_RULES.spec(("batch", "seq"), make_mesh("data=2,fsdp=4")) == P(("data", "fsdp"))
    assert INFER_RULES.spec(("batch", "seq"), make_mesh("data=2,fsdp=4")) == P("data")


def test_query_heads_not_divisible_by_tensor():
    with pytest.raises(UserError, match=r"mesh data=1,fsdp=1,tensor=3: the model's 32 query heads "
                                        r"are not divisible by tensor=3; "
                                        r"use tensor in \[1, 2, 4, 8, 16, 32\]"):
        check_model_fits(BIG, make_mesh("tensor=3"), TRAIN_RULES)
    check_model_fits(BIG, make_mesh("fsdp=2,tensor=4"), TRAIN_RULES)


def test_kv_heads_the_tensor_axis_cannot_split_are_replicated():
    mesh = make_mesh("fsdp=2,tensor=4")                    # tiny: 2 kv heads
    for rules in (TRAIN_RULES, INFER_RULES):
        fitted = rules.for_model(TINY, mesh)
        assert fitted.table == {**rules.table, "kv_heads": ()}
        assert fitted.for_model(TINY, mesh) is fitted      # idempotent
        assert rules.for_model(TINY, make_mesh("tensor=2")) is rules  # 2 divide 2
        shardings = param_shardings(TINY, mesh, rules)["layers"]
        assert shardings["k"].spec == shardings["v"].spec == P(None, "fsdp")
        assert shardings["q"].spec == P(None, "fsdp", "tensor")  # query heads stay split
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "k"))
    state = state_shardings(TINY, abstract_state(TINY, optax.adamw(1e-3), lora=lora), mesh,
                            TRAIN_RULES, lora)
    assert state.params["k"]["b"].spec == P()          # [layers, rank, kv_heads, head_dim]
    assert state.params["q"]["b"].spec == P(None, None, "tensor")
    assert cache_heads(TINY, mesh, INFER_RULES) == 4     # each kv head twice: 1 per device
    assert cache_heads(TINY, make_mesh("tensor=2"), INFER_RULES) == 2
    assert cache_heads(BIG, make_mesh("fsdp=8"), TRAIN_RULES) == 8
    cache = cache_shardings(mesh, INFER_RULES)
    assert cache.k.spec == P(None, None, "tensor") and cache.k == cache.v


def test_vocab_padded_to_a_multiple_of_128():
    odd = TINY.replace(vocab_size=517)
    assert padded_vocab_size(odd) == 640 and padded_vocab_size(TINY) == 512
    assert padded_vocab_size(BIG) == BIG.vocab_size == 128256
    assert padded_vocab_size(BIG.replace(vocab_size=128257)) == 128384
    assert param_specs(odd)["embed"].shape == (640, 64)
    assert param_specs(odd)["lm_head"].shape == (64, 640)
    shardings = param_shardings(odd, make_mesh("data=2,fsdp=2,tensor=2"), TRAIN_RULES)
    assert shardings["embed"].shard_shape((640, 64)) == (320, 32)
    params = init_params(odd, jax.random.key(0))
    assert not np.any(np.asarray(params["embed"])[517:])
    assert not np.any(np.asarray(params["lm_head"])[:, 517:])
    assert np.all(np.asarray(params["embed"])[:517].std(axis=1) > 0)
    with pytest.raises(UserError, match=r"the vocabulary \(517 tokens, padded to 640, a multiple "
                                        r"of 128\) is not divisible by tensor=3"):
        check_model_fits(odd.replace(num_attention_heads=6, head_dim=16, num_key_value_heads=3),
                         make_mesh("tensor=3"), INFER_RULES)


def test_other_dims_that_do_not_divide():
    odd = TINY.replace(hidden_size=60, head_dim=20, num_attention_heads=4)
    with pytest.raises(UserError, match="embed size 60 is not divisible by mesh axes fsdp = 8"):
        check_model_fits(odd, make_mesh("fsdp=8"), TRAIN_RULES)


def test_batch_not_divisible_by_the_data_axes():
    with pytest.raises(UserError, match=r"batch size 6 .* data x fsdp = 4 .* multiple of 4"):
        check_batch(6, make_mesh("data=2,fsdp=2,tensor=2"), TRAIN_RULES)
    check_batch(6, make_mesh("fsdp=4,tensor=2"), INFER_RULES)  # inference: data axis only


# ---- placement -------------------------------------------------------------------------
def test_optimizer_state_follows_the_params():
    mesh = make_mesh("fsdp=4,tensor=2")
    params = abstract_params(TINY)
    shardings = param_shardings(TINY, mesh, TRAIN_RULES)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = jax.eval_shape(opt.init, params)
    derived = derived_shardings(state, params, shardings, mesh)
    adam = derived[1][0]
    assert adam.mu == shardings and adam.nu == shardings
    assert adam.count.spec == P()


def test_sharded_init_matches_unsharded_and_never_holds_the_whole_model():
    mesh = make_mesh("fsdp=4,tensor=2")
    key = jax.random.key(0)
    compiled = sharded_initializer(TINY, mesh, TRAIN_RULES).lower(key).compile()
    reference = jax.jit(lambda k: init_params(TINY, k))(key)
    params = compiled(key)
    for got, want, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(reference),
                                   jax.tree.leaves(param_shardings(TINY, mesh, TRAIN_RULES))):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    total = sum(x.nbytes for x in jax.tree.leaves(reference))
    stats = compiled.memory_analysis()
    assert stats.output_size_in_bytes < total / 4
    assert stats.temp_size_in_bytes < total / 2


def test_place_cuts_host_arrays_per_device():
    mesh = make_mesh("data=2,tensor=4")
    host = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    placed = place({"x": host}, {"x": TRAIN_RULES.sharding(mesh, ("batch", "mlp"))})["x"]
    assert placed.addressable_shards[0].data.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(placed), host)


# ---- multi-process start-up ------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "MEDITRON_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sharding.distributed.on_tpu_vm", lambda: False)
    return monkeypatch


def test_single_process_by_default(clean_env):
    assert initialize_distributed() is False
    parser = argparse.ArgumentParser()
    add_distributed_arguments(parser)
    assert initialize_from_args(parser.parse_args([])) is False


@pytest.mark.parametrize("args, env, message", [
    (("10.0.0.1:1234", None, 0), {}, "needs --num-processes and --process-id"),
    (("10.0.0.1", 2, 0), {}, "expected HOST:PORT"),
    (("10.0.0.1:1234", 2, 2), {}, r"process id 2 is outside 0..1"),
    ((None, 2, 0), {}, "need --coordinator"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "x"},
     "JAX_NUM_PROCESSES='x' must be an integer"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     "needs --num-processes and --process-id"),
    ((None, None, None), {"MEDITRON_DISTRIBUTED": "yes"}, "use 1 .* or 0"),
])
def test_bad_multi_process_settings(clean_env, args, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(UserError, match=message):
        initialize_distributed(*args)


def test_tpu_vm_starts_the_auto_detected_cluster(clean_env):
    calls = []
    clean_env.setattr("sharding.distributed.on_tpu_vm", lambda: True)
    clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert initialize_distributed(timeout_s=5) is True
    assert calls == [{"initialization_timeout": 5}]
    clean_env.setenv("MEDITRON_DISTRIBUTED", "0")
    assert initialize_distributed() is False
