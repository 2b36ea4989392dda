"""Backend kernels, chosen in one place.

The decoder computes attention through a :class:`Kernels` value, built once by
:func:`select` when a step (training, prefill, scoring) is built and closed over by the
jitted function, so the choice is part of what was compiled and never read again from
the environment. Two calls exist:

- ``causal_attention(q, k, v, segment_ids)``: self-attention over whole sequences
  (training, scoring, prefill into an empty cache): q [B,T,N,H], k/v [B,T,K,H],
  segment ids [B,T] (0 = padding). ``xla`` (:mod:`.xla`, every backend), ``splash``
  (:mod:`.splash`, JAX's Pallas TPU kernel inside ``shard_map``) or ``cudnn``
  (:mod:`.cudnn`, cuDNN flash attention on GPU).
- ``cached_attention(q, k, v, mask)``: queries against the KV cache [B,K,S,H] (decoding,
  continuing a cache): XLA on every backend.

Context parallelism (:mod:`.context`): on a mesh whose ``context`` axis splits the
sequence, ``causal_attention`` runs blockwise XLA attention in ``shard_map`` over all-gathered
keys/values, and :meth:`Kernels.for_sequence` gives the decoder the load-balanced token order
of a forward (splash and cuDNN take no sequence shards: asking for them is an error).

``auto`` picks splash on TPU, cuDNN on GPU where it can take the inputs (bfloat16/float16,
one document per row: inference; :mod:`.cudnn` says why not otherwise), XLA elsewhere;
the choice and its reason go to the ``meditron_jax.kernels`` logger and into the run's
records (``train_run.json``). A shape a kernel cannot take falls back to XLA with a
warning at trace time, never silently.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
from jax.sharding import Mesh

from meditron_jax.errors import UserError
from meditron_jax.kernels import xla

ATTENTION = ("auto", "xla", "splash", "cudnn")
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Kernels:
    attention: str = "xla"            # what runs: xla | splash | cudnn
    reason: str = "the default"       # why (for the logs)
    mesh: Mesh | None = None          # splash: the mesh its shard_map splits over
    batch_axes: tuple[str, ...] = ()  # splash: mesh axes of the batch dim
    head_axis: str | None = None      # splash: mesh axis of the heads dim
    interpret: bool = False           # splash: Pallas' interpreter (tests on CPU)
    context_axis: str | None = None   # context parallelism: the mesh axis splitting the sequence
    balanced: bool = True             # context: tokens in the load-balanced order (.context)

    def causal_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                         segment_ids: jax.Array) -> jax.Array:
        if self.context_axis is not None:
            from meditron_jax.kernels import context
            return context.context_attention(
                q, k, v, segment_ids, mesh=self.mesh, axis=self.context_axis,
                batch_axes=self.batch_axes, head_axis=self.head_axis, balanced=self.balanced)
        if self.attention == "splash":
            from meditron_jax.kernels import splash
            if q.shape[1] % splash.LANES == 0:
                return splash.splash_attention(
                    q, k, v, segment_ids, mesh=self.mesh, batch_axes=self.batch_axes,
                    head_axis=self.head_axis, interpret=self.interpret)
            _log.warning("splash attention needs a sequence length that is a multiple of "
                         "%d; XLA attention runs for length %d", splash.LANES, q.shape[1])
        elif self.attention == "cudnn":
            from meditron_jax.kernels import cudnn
            return cudnn.causal_attention(q, k, v, segment_ids, layout="padded")
        return xla.causal_attention(q, k, v, segment_ids)

    def cached_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: jax.Array) -> jax.Array:
        return xla.cached_attention(q, k, v, mask)

    @property
    def context_shards(self) -> int:
        return self.mesh.shape[self.context_axis] if self.context_axis is not None else 1

    def for_sequence(self, t: int, *, cache: bool = False, prefill: bool = False):
        """``(kernels, order)`` for one forward over ``t`` tokens: without a cache (training,
        scoring) the tokens run in the load-balanced order ``order`` (its ``arrange`` applied to
        tokens, positions and segment ids, its ``restore`` to the final hidden states); a
        prefill keeps the natural order (the cache is written in it); decoding never uses the
        context path. Without context parallelism: these kernels, the identity order."""
        from meditron_jax.kernels import context
        if self.context_axis is None or (cache and not prefill):
            return self, context.SequenceOrder(1)
        context.check_length(t, self.context_shards)
        if cache:
            return dataclasses.replace(self, balanced=False), context.SequenceOrder(1)
        return self, context.SequenceOrder(self.context_shards)

    def describe(self) -> str:
        text = f"attention {self.attention} ({self.reason})"
        if self.context_axis is not None:
            text += (f", context-parallel over {self.context_axis}={self.context_shards} "
                     "(all-gathered K/V, blockwise, load-balanced)")
        return text

    def record(self) -> dict:
        """What the run records (``train_run.json``)."""
        out = {"attention": self.attention, "reason": self.reason}
        if self.context_axis is not None:
            out["context"] = {"axis": self.context_axis, "shards": self.context_shards}
        return out


XLA = Kernels()


def platform_of(mesh: Mesh | None) -> str:
    """The platform the step compiles for: the mesh's devices' (a TPU topology planned
    from a CPU host says ``tpu``), else JAX's default backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def select(attention: str = "auto", *, mesh: Mesh | None = None,
           batch_axes: tuple[str, ...] = (), head_axis: str | None = None,
           platform: str | None = None, interpret: bool = False, dtype=None,
           head_dim: int | None = None, packed: bool = False,
           context_axis: str | None = None) -> Kernels:
    """The kernels for a step on ``mesh`` (or one device of ``platform``); ``attention``
    is ``auto`` or a name from :data:`ATTENTION` (the ``--attention`` flag, the run
    config's ``model.attention``). ``dtype``/``head_dim`` (the compute dtype and the model's
    head dim) and ``packed`` (rows holding several documents: training) decide whether
    cuDNN can take the step. ``context_axis``: the mesh axis the sequence is split over
    (context parallelism, XLA blockwise attention; size 1 or None: none). Logged once per call."""
    if attention not in ATTENTION:
        raise UserError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION)}")
    platform = platform or platform_of(mesh)
    if context_axis is not None and (mesh is None or dict(mesh.shape).get(context_axis, 1) == 1):
        context_axis = None
    if context_axis is not None:
        shards = mesh.shape[context_axis]
        if attention in ("splash", "cudnn"):
            raise UserError(f"--attention {attention} cannot take a sequence split over mesh "
                            f"axis {context_axis}={shards}; use --attention auto or xla")
        choice, reason = "xla", f"{attention} with a {context_axis} axis"
    elif attention == "auto":
        if platform == "tpu":
            choice, reason = "splash", "auto on tpu"
        elif platform == "gpu":
            ok, why = _cudnn_takes(dtype, head_dim, packed)
            choice, reason = ("cudnn", "auto on gpu") if ok else ("xla", f"auto on gpu: {why}")
        else:
            choice, reason = "xla", f"auto on {platform}"
    else:
        choice, reason = attention, "requested"
        if choice == "splash" and platform != "tpu" and not interpret:
            raise UserError(f"--attention splash is a TPU kernel and this run is on "
                            f"{platform}; use --attention auto or xla")
        if choice == "cudnn":
            if platform != "gpu":
                raise UserError(f"--attention cudnn needs a GPU and this run is on "
                                f"{platform}; use --attention auto or xla")
            ok, why = _cudnn_takes(dtype, head_dim, packed)
            if not ok:
                raise UserError(f"--attention cudnn: {why}; use --attention auto or xla")
    sharded = choice == "splash" or context_axis is not None
    kernels = Kernels(choice, reason, mesh if sharded else None,
                      tuple(batch_axes) if sharded else (),
                      head_axis if sharded else None, interpret, context_axis)
    # an accelerator without its kernel is worth a warning line, never a silent fallback
    fallback = platform in ("gpu", "tpu") and choice == "xla" and attention == "auto"
    _log.log(logging.WARNING if fallback else logging.INFO, "kernels: %s", kernels.describe())
    return kernels


def _cudnn_takes(dtype, head_dim, packed: bool) -> tuple[bool, str]:
    """Whether cuDNN flash attention runs this step (:mod:`.cudnn`), else the reason."""
    from meditron_jax.kernels import cudnn
    ok, why = cudnn.available()
    if not ok:
        return False, why
    if packed:
        # JAX 0.10.2 packs segments through offsets sized by a fixed per-row segment cap,
        # and packed training rows have none (kernels/cudnn.py)
        return False, ("packed training rows have no per-row segment cap for cuDNN's "
                       "offsets: XLA attention runs instead")
    return cudnn.supports("padded", dtype if dtype is not None else "bfloat16",
                          head_dim or 128)
