"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask.

The update matches ``torch.optim.AdamW`` (decoupled decay ``lr * wd * w``, bias-corrected
moments, eps outside the square root), which the parity test checks step for step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.config import OptimSection

# Parameters never decayed: the norms' gains (decaying them pulls the scale towards 0)
# and the token embedding (rows of rare tokens would shrink for no reason).
NO_DECAY = frozenset({"attn_norm", "mlp_norm", "final_norm", "embed"})


def schedule(opt: OptimSection, total_steps: int) -> optax.Schedule:
    """Learning rate for update ``count`` (0-based): linear warmup to ``lr`` ending at
    ``warmup_steps``, then cosine / linear decay to ``lr * min_lr_ratio`` at
    ``total_steps``. The first update already uses ``lr / warmup_steps`` (not 0)."""
    peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
    warmup = max(opt.warmup_steps, 0)
    decay_steps = max(total_steps - warmup, 1)

    def lr(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * jnp.minimum(1.0, step / max(warmup, 1)) if warmup else jnp.float32(peak)
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if opt.decay == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif opt.decay == "linear":
            decayed = peak + (floor - peak) * frac
        else:
            decayed = jnp.float32(peak)
        return jnp.where(step <= warmup, warm, decayed)
    return lr


def decay_mask(params):
    """True where weight decay applies: every parameter not named in :data:`NO_DECAY`."""
    def keep(path, _):
        names = {str(getattr(p, "key", getattr(p, "name", ""))) for p in path}
        return not (names & NO_DECAY)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: OptimSection, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)
