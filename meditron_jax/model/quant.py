"""Weight-only int8: every projection and the head stored as int8 with a float32 scale per
output channel (symmetric, absmax), as :class:`qwix.QArray` values in the params tree.

Activations stay in the compute dtype: the decoder dequantizes each layer's weights where
it casts them to the compute dtype (:func:`materialize`), inside the scan, so XLA reads the
int8 bytes and fuses the scale into the matmul's operand; decoding, bound by reading the
weights, streams half the bytes of bfloat16. The embedding stays in its dtype (a gather
reads one row per token). Quantized weights shard like the weights they replace: the
int8 values by the weight's logical axes, the scales by the output axes
(:func:`logical_axes`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix

from meditron_jax.errors import UserError
from meditron_jax.model.params import Params, logical_axes as weight_axes

SCHEMES = ("int8",)
# Stacked layer weights -> how many dims after L each contracts (o contracts N and H).
_CONTRACTS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def check_scheme(scheme: str | None) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise UserError(f"--quantize {scheme!r} is not supported; choose one of "
                        f"{', '.join(SCHEMES)}")


def _channels(ndim: int, contracts: int, stacked: bool) -> tuple[int, ...]:
    """Axes with their own scale: the layer axis and every output axis."""
    lead = 1 if stacked else 0
    return tuple(range(lead)) + tuple(range(lead + contracts, ndim))


def quantize_params(params: Params, scheme: str = "int8") -> Params:
    """The same params with each projection (stacked [L, ...]) and an untied head as int8
    QArrays; call it under ``jax.jit`` with ``out_shardings`` to quantize sharded. Scales are
    computed from float32 (from bfloat16 weights they would carry bfloat16's rounding)."""
    check_scheme(scheme)
    layers = dict(params["layers"])
    for name, contracts in _CONTRACTS.items():
        w = layers[name]
        layers[name] = qwix.quantize(w.astype(jnp.float32), jnp.int8,
                                     channelwise_axes=_channels(w.ndim, contracts, True))
    out = {**params, "layers": layers}
    if "lm_head" in params:
        out["lm_head"] = qwix.quantize(params["lm_head"].astype(jnp.float32), jnp.int8,
                                       channelwise_axes=(1,))
    return out


def is_quantized(x) -> bool:
    return isinstance(x, qwix.QArray)


def materialize(w, dtype) -> jax.Array:
    """A weight in the compute dtype: dequantized if it is a QArray."""
    if is_quantized(w):
        return qwix.dequantize(w).astype(dtype)
    return w.astype(dtype)


def logical_axes(cfg, quantized: Params | None = None) -> dict:
    """Logical axes of :func:`quantize_params`'s tree: a QArray of the weight's axes for its
    int8 values and of its output axes (None on the contracted, size-1 dims) for its scale."""
    axes = weight_axes(cfg)

    def q_axes(a: tuple, contracts: int, stacked: bool) -> qwix.QArray:
        keep = set(_channels(len(a), contracts, stacked))
        scale = tuple(n if i in keep else None for i, n in enumerate(a))
        return qwix.QArray(qvalue=a, scale=scale, zero_point=None, qtype=jnp.int8)

    layers = dict(axes["layers"])
    for name, contracts in _CONTRACTS.items():
        layers[name] = q_axes(layers[name], contracts, True)
    out = {**axes, "layers": layers}
    if "lm_head" in axes:
        out["lm_head"] = q_axes(axes["lm_head"], 1, False)
    return out


def weight_bytes(params: Params) -> int:
    """Bytes of every array in ``params`` (int8 values, their scales, the rest)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
