"""Plans for TPU targets, compiled by libtpu for topologies that are not attached (no
TPU needed). The 8B train step is refused fast on v5e-4; its full compile on v6e-8
(about a minute on 2 idle cores, several on a busy machine) runs with
MEDITRON_TPU_8B_PLAN=1, and its numbers are in bench/PLAN.md."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest

from cli.plan import make_plan
from meditron_jax.model.config import preset
from meditron_jax.errors import UserError
from sharding import make_mesh
from sharding.aot import TPU_GENERATIONS, refusal_sizes, resolve_target

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install 'meditron-jax[tpu]')")
BIG = preset("meditron3-8b")
TINY = preset("tiny")


@pytest.mark.parametrize("target, count, kind", [
    ("tpu:v5e:2x4", 8, "TPU v5 lite"), ("tpu:v6e:2x4", 8, "TPU v6 lite"),
    ("tpu:v5p:2x2x1", 4, "TPU v5"), ("tpu:v4:2x2x1", 4, "TPU v4"), ("tpu:v5e:2x2", 4, "TPU v5 lite"),
])
def test_topologies(target, count, kind):
    resolved = resolve_target(target)
    assert len(resolved.devices) == count and resolved.device_kind == kind
    assert resolved.memory_bytes == TPU_GENERATIONS[target.split(":")[1]].hbm_bytes


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDITRON_TPU_8B_PLAN") != "1",
                    reason="full 8B TPU compile; set MEDITRON_TPU_8B_PLAN=1 (see bench/PLAN.md)")
def test_full_8b_train_step_fits_on_v6e_8():
    plan = make_plan(BIG, model="meditron3-8b", mode="train", target="tpu:v6e:2x4",
                     mesh="fsdp=8", batch=8, seq=2048, remat="full")
    print("\n" + plan.format())
    state = 12 * BIG.num_params() / 8
    assert abs(plan.memory.arguments - state) / state < 0.01
    assert plan.memory.fits and plan.memory.required < 32 * 2 ** 30


def test_8b_train_step_at_a_large_batch_does_not_fit_on_v5e_4():
    plan = make_plan(BIG, model="meditron3-8b", mode="train", target="tpu:v5e:2x2",
                     mesh="fsdp=4", batch=16, seq=2048, remat="full")
    print("\n" + plan.format())
    assert not plan.memory.fits and "does not fit" in plan.format()
    needed, available = refusal_sizes(plan.memory.refusal)[-2:]
    assert needed > available and 15 * 2 ** 30 < available <= 16 * 2 ** 30
    assert plan.flops > 0  # counted on the global program even though it cannot run here


def test_multi_slice_mesh_puts_data_across_slices():
    target = resolve_target("tpu:v5e:2x4:2")
    mesh = make_mesh("data=2,fsdp=8", devices=list(target.devices))
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    with pytest.raises(UserError, match="data=1 must be a multiple of the 2 TPU slices"):
        make_mesh("fsdp=16", devices=list(target.devices))
    plan = make_plan(TINY, model="tiny", mode="train", target="tpu:v5e:2x4:2",
                     mesh="data=2,fsdp=8", batch=16, seq=64)
    assert plan.memory.fits and plan.devices == 16 and plan.target == "tpu:v5e:2x4:2"


def test_splash_drops_the_score_matrix_from_a_train_step_on_v6e_8():
    # A tiny model at 4096 tokens: attention's [N, T, T] float32 scores (4 heads: 256 MiB
    # per row, one row per chip under fsdp=8) dwarf everything else the step holds.
    seq = 4096
    cfg = dataclasses.replace(TINY, max_position_embeddings=seq)
    plans = {attention: make_plan(cfg, model="tiny", mode="train", target="tpu:v6e:2x4",
                                  mesh=None, batch=8, seq=seq, attention=attention)
             for attention in ("xla", "splash")}
    scores = cfg.num_attention_heads * seq * seq * 4
    xla, splash = plans["xla"].memory, plans["splash"].memory
    assert xla.fits and splash.fits and plans["splash"].mesh == "data=1,fsdp=8,tensor=1"
    assert xla.temporaries > scores           # XLA materializes at least one score matrix
    assert splash.temporaries < scores / 8    # the kernel never does (19 MiB here)
    assert xla.temporaries - splash.temporaries > scores
    assert splash.arguments == xla.arguments  # same state; only attention differs
    for attention, plan in plans.items():
        assert f"attention {attention} (requested)" in plan.settings
        assert f"attention {attention} (requested)" in plan.format().splitlines()[1]


def test_decode_step_on_tpu():
    plan = make_plan(TINY, model="tiny", mode="infer", target="tpu:v6e:2x4",
                     mesh="data=4,tensor=2", batch=8, seq=128)
    assert plan.memory.fits and plan.device_kind == "TPU v6 lite"


def test_context_parallel_train_step_on_v5p_4():
    """A `context` axis splits each row's sequence (meditron_jax/kernels/context.py): one
    row of 1024 tokens over 4 chips (the tiny model's 256 per chip), XLA blockwise attention
    in shard_map, named on the plan's settings line; a length that 2 x context does not
    divide, or splash asked for with it, is refused before compiling."""
    seq = 1024
    cfg = dataclasses.replace(TINY, max_position_embeddings=seq)
    plan = make_plan(cfg, model="tiny", mode="train", target="tpu:v5p:2x2x1",
                     mesh="context=4", batch=1, seq=seq)
    assert plan.memory.fits and plan.mesh == "data=1,fsdp=1,context=4,tensor=1"
    assert "context-parallel over context=4" in plan.format().splitlines()[1]
    assert plan.flops > plan.model_flops   # remat recomputes the forward
    with pytest.raises(UserError, match=r"sequence length 1020 is not divisible by 2 x "
                                        r"context=4 \(= 8"):
        make_plan(cfg, model="tiny", mode="train", target="tpu:v5p:2x2x1", mesh="context=4",
                  batch=1, seq=seq - 4)
    with pytest.raises(UserError, match="--attention splash cannot take a sequence split "
                                        "over mesh axis context=4"):
        make_plan(cfg, model="tiny", mode="train", target="tpu:v5p:2x2x1", mesh="context=4",
                  batch=1, seq=seq, attention="splash")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDITRON_TPU_8B_PLAN") != "1",
                    reason="full 8B TPU compile; set MEDITRON_TPU_8B_PLAN=1")
def test_8b_train_step_at_131072_tokens_fits_with_context_parallelism_on_v5p_4():
    plan = make_plan(BIG, model="meditron3-8b", mode="train", target="tpu:v5p:2x2x1",
                     mesh="context=4", batch=1, seq=131072, remat="full")
    print("\n" + plan.format())
    assert plan.memory.fits
