"""Ahead-of-time plans: compile a step for a target's devices from abstract inputs only.

A target is ``cpu:N`` (this host's CPU devices) or ``tpu:GEN:TOPOLOGY[:SLICES]`` (e.g.
``tpu:v6e:2x4``): TPU slices described by libtpu (``pip install '.[tpu]'``) without
any TPU attached. The step is lowered and compiled against ``ShapeDtypeStruct``
arguments, so no weights are read and no device memory is allocated; XLA then
reports per-device memory, and the TPU compiler refuses a program that does not fit
in HBM, which :func:`compile_plan` reports as "does not fit" with the compiler's
figure.

FLOPs: XLA's cost analysis counts a loop body once, whatever its trip count, so a
32-layer scanned decoder would count as one layer. :func:`step_flops` rewrites the
step's jaxpr with every ``scan`` fully unrolled and lowers it (no compile) before
asking XLA, so each layer and each loss chunk is counted. A ``while_loop`` (the
decode loop) has no static trip count and counts once: one decode step.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
from jax.extend import core as jcore

from meditron_jax.errors import UserError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    chip_config: str     # "megacore": one JAX device per chip, both TensorCores
    hbm_bytes: int       # per JAX device
    dims: int            # 2-D (v5e, v6e) or 3-D (v4, v5p) torus


TPU_GENERATIONS = {
    "v4": TpuGeneration("megacore", 32 * GiB, 3),
    "v5p": TpuGeneration("megacore", 95 * GiB, 3),
    "v5e": TpuGeneration("default", 16 * GiB, 2),
    "v6e": TpuGeneration("default", 32 * GiB, 2),
}
TARGET_EXAMPLES = ("cpu:8", "tpu:v5e:2x4", "tpu:v5p:2x2x1", "tpu:v6e:2x4", "tpu:v4:2x2x1",
                   "tpu:v5e:2x2")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: tuple
    memory_bytes: int    # what one device may use: HBM, or host RAM shared by the CPU devices
    memory_label: str

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


def resolve_target(spec: str) -> Target:
    """``cpu``, ``cpu:N`` or ``tpu:GEN:TOPOLOGY[:SLICES]`` -> devices to compile for
    (``tpu:v5e:2x4:2``: two v5e-8 slices joined by the data-centre network)."""
    parts = spec.strip().lower().split(":")
    if parts[0] == "cpu" and len(parts) <= 2:
        return _cpu_target(spec, parts[1] if len(parts) == 2 else None)
    if parts[0] == "tpu" and len(parts) in (3, 4):
        slices = parts[3] if len(parts) == 4 else "1"
        if not slices.isdigit() or int(slices) < 1:
            raise UserError(f"target {spec!r}: the slice count must be a positive integer")
        return _tpu_target(spec, parts[1], parts[2], int(slices))
    raise UserError(f"target {spec!r}: expected cpu:N or tpu:GEN:TOPOLOGY[:SLICES], e.g. "
                    f"{', '.join(TARGET_EXAMPLES)}")


def _cpu_target(spec: str, count: str | None) -> Target:
    devices = jax.devices("cpu")
    n = len(devices)
    if count is not None:
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"target {spec!r}: the CPU device count must be a positive integer")
        n = int(count)
    if n > len(devices):
        raise UserError(f"target {spec!r}: this process has {len(devices)} CPU device(s); set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting "
                        "(the plan command does it for you)")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target(f"cpu:{n}", tuple(devices[:n]), ram // n, f"host RAM / {n}")


def _tpu_target(spec: str, generation: str, topology: str, slices: int) -> Target:
    gen = TPU_GENERATIONS.get(generation)
    if gen is None:
        raise UserError(f"target {spec!r}: unknown TPU generation {generation!r}; use one of "
                        f"{', '.join(TPU_GENERATIONS)}")
    dims = topology.split("x")
    if len(dims) != gen.dims or not all(d.isdigit() and int(d) > 0 for d in dims):
        example = "2x2x1" if gen.dims == 3 else "2x4"
        raise UserError(f"target {spec!r}: a {generation} topology has {gen.dims} dimensions, "
                        f"e.g. tpu:{generation}:{example}")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"target {spec!r} needs libtpu to compile for TPU (no TPU needed): "
                        "pip install 'meditron-jax[tpu]'")
    shape = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    # Hosts hold 4 chips (2x2x1), except the single-host 8-chip v5e/v6e slices (2x4x1).
    host = (2, 4, 1) if gen.dims == 2 and math.prod(shape) <= 8 else (2, 2, 1)
    bounds = tuple(min(s, h) for s, h in zip(shape, host))
    # libtpu takes a per-VM lock on /tmp/libtpu_lockfile; a compile-only topology drives
    # no chip, so it may share libtpu with other processes on this host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{generation}:{topology}",
            chip_config_name=gen.chip_config, chips_per_host_bounds=bounds, num_slices=slices,
            wrap=(False, False, False))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"target {spec!r}: libtpu refused the topology: "
                        f"{_first_line(exc)}") from None
    name = f"tpu:{generation}:{topology}" + (f":{slices}" if slices > 1 else "")
    return Target(name, tuple(topo.devices), gen.hbm_bytes, "HBM")


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one compiled step (or the compiler's refusal)."""
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0      # outputs written into donated arguments (counted once)
    temporaries: int = 0
    code: int = 0
    compiler_peak: int = 0
    capacity: int = 0
    capacity_label: str = ""
    compile_s: float = 0.0
    refusal: str | None = None  # the compiler's out-of-memory message

    @property
    def required(self) -> int:
        """Arguments + outputs - aliased + temporaries + code: what must be resident."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return self.refusal is None and self.required <= self.capacity


def compile_plan(fn, args: tuple, target: Target) -> MemoryPlan:
    """Lower + compile ``fn(*args)`` (ShapeDtypeStructs) and read XLA's memory analysis."""
    plan = MemoryPlan(capacity=target.memory_bytes, capacity_label=target.memory_label)
    start = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as exc:
        if "RESOURCE_EXHAUSTED" not in str(exc):
            raise
        plan.compile_s = time.perf_counter() - start
        plan.refusal = _first_line(exc).replace("RESOURCE_EXHAUSTED: ", "")
        return plan
    plan.compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    plan.arguments = int(stats.argument_size_in_bytes)
    plan.outputs = int(stats.output_size_in_bytes)
    plan.aliased = int(stats.alias_size_in_bytes)
    plan.temporaries = int(stats.temp_size_in_bytes)
    plan.code = int(stats.generated_code_size_in_bytes)
    plan.compiler_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return plan


def step_flops(fn, args: tuple) -> float:
    """Global FLOPs of one call of ``fn(*args)``, every ``scan`` unrolled (see module doc)."""
    closed = fn.trace(*args).jaxpr
    unrolled = closed.replace(jaxpr=_unroll_scans(closed.jaxpr))
    lowered = jax.jit(jcore.jaxpr_as_fun(unrolled)).lower(*jax.tree.leaves(args))
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _unroll_scans(jaxpr: jcore.Jaxpr) -> jcore.Jaxpr:
    eqns = []
    for eqn in jaxpr.eqns:
        params = {k: _unroll_param(v) for k, v in eqn.params.items()}
        if eqn.primitive is jax.lax.scan_p:
            params["unroll"] = max(int(params["length"]), 1)
        eqns.append(eqn.replace(params=params))
    return jaxpr.replace(eqns=eqns)


def _unroll_param(value: Any) -> Any:
    if isinstance(value, jcore.ClosedJaxpr):
        return value.replace(jaxpr=_unroll_scans(value.jaxpr))
    if isinstance(value, jcore.Jaxpr):
        return _unroll_scans(value)
    if isinstance(value, tuple) and any(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr))
                                        for v in value):
        return tuple(_unroll_param(v) for v in value)  # cond branches
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_SIZE = re.compile(r"([\d.]+)\s*([KMGT])i?B?\b")


def refusal_sizes(message: str) -> list[float]:
    """The byte figures in a compiler out-of-memory message ("38.24G" -> 38.24 * 2**30)."""
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    return [float(n) * scale[u] for n, u in _SIZE.findall(message)]

