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

    def causal_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                         segment_ids: jax.Array) -> jax.Array:
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

    def describe(self) -> str:
        return f"attention {self.attention} ({self.reason})"

    def record(self) -> dict:
        """What the run records (``train_run.json``)."""
        return {"attention": self.attention, "reason": self.reason}


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
           head_dim: int | None = None, packed: bool = False) -> Kernels:
    """The kernels for a step on ``mesh`` (or one device of ``platform``); ``attention``
    is ``auto`` or a name from :data:`ATTENTION` (the ``--attention`` flag, the run
    config's ``model.attention``). ``dtype``/``head_dim`` (the compute dtype and the model's
    head dim) and ``packed`` (rows holding several documents: training) decide whether
    cuDNN can take the step. Logged once per call."""
    if attention not in ATTENTION:
        raise UserError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION)}")
    platform = platform or platform_of(mesh)
    if attention == "auto":
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
    kernels = Kernels(choice, reason, mesh if choice == "splash" else None,
                      tuple(batch_axes) if choice == "splash" else (),
                      head_axis if choice == "splash" else None, interpret)
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
