"""What the sharding tests run on every mesh: a forward pass and one real train step.

Used in one process (tests/test_sharding_equivalence.py) and by each process of the
localhost multi-process test (tests/multihost_worker.py), so every side computes
exactly the same thing and only the mesh differs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.model.config import LlamaConfig
from meditron_jax.model import forward
from sharding import activation_constrainer, place
from sharding.rules import Rules
from train.config import OptimSection
from train.optim import make_optimizer, schedule
from train.step import (StepOptions, abstract_state, batch_shardings, init_state,
                        jit_train_step, make_train_step, state_shardings)

BATCH, SEQ = 8, 12


def make_batch(vocab: int) -> dict[str, np.ndarray]:
    """Packed rows (two documents), a padded row, plain rows; the same on every process."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, vocab, size=(BATCH, SEQ + 1), dtype=np.int32)
    segments = np.ones((BATCH, SEQ), np.int32)
    segments[0, 5:] = 2
    segments[3, 7:] = 2
    segments[5, 9:] = 0
    return packed_batch(tokens, segments)


def packed_batch(tokens: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
    """A training batch from tokens [B, T+1] and segment ids [B, T] (0 = padding): each
    document's positions restart at 0, loss weight on every non-padding token."""
    positions = np.zeros(segments.shape, np.int32)
    for col in range(1, segments.shape[1]):
        same = segments[:, col] == segments[:, col - 1]
        positions[:, col] = np.where(same, positions[:, col - 1] + 1, 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": (segments > 0).astype(np.float32), "segment_ids": segments,
            "positions": positions}


def gather(x: jax.Array) -> np.ndarray:
    """The full value on every process (an all-gather when other processes hold shards)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def forward_and_step(cfg: LlamaConfig, params, mesh, rules: Rules) -> dict[str, np.ndarray]:
    """Logits, and loss + updated params after one AdamW step, in float32.

    ``params`` must already be in ``param_shardings(cfg, mesh, rules)``.
    """
    constrain = activation_constrainer(mesh, rules)
    batch = place(make_batch(cfg.vocab_size), batch_shardings(mesh, rules))
    logits = jax.jit(lambda p, b: forward(
        p, b["inputs"], cfg, positions=b["positions"], segment_ids=b["segment_ids"],
        constrain=constrain)[0])(params, batch)

    # Adam's first update is g / (|g| + eps), about sign(g): with the default eps a
    # gradient that is zero up to rounding would flip sign between reduction orders.
    # eps=1e-3 keeps the update a smooth function of the gradient, so the comparison
    # tests the sharding, not the sign of rounding noise.
    optim = OptimSection(lr=1e-3, warmup_steps=0, eps=1e-3)
    optimizer = make_optimizer(optim, total_steps=10)
    opts = StepOptions(compute_dtype=jnp.float32, remat="none")
    shardings = state_shardings(cfg, abstract_state(cfg, optimizer), mesh, rules)
    state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=shardings)(params)
    step = jit_train_step(make_train_step(cfg, optimizer, schedule(optim, 10), opts, constrain),
                          shardings, mesh, rules)
    state, metrics = step(state, batch)
    out = {"logits": gather(logits), "loss": gather(metrics["loss"])}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        out["param/" + "/".join(str(k.key) for k in path)] = gather(leaf)
    return out


def assert_close(actual: dict, desired: dict) -> None:
    """float32 agreement to 1e-5 of each array's scale (sharded reductions sum in another
    order, so bitwise equality is not expected)."""
    assert set(actual) == set(desired)
    for name, want in desired.items():
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(actual[name], want, rtol=0, atol=1e-5 * scale, err_msg=name)
