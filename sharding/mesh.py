"""One device mesh with named axes ``data``, ``fsdp``, ``tensor`` (and ``context`` when it is
given a size above 1: context parallelism, the sequence split over it), from a spec string.

The same function builds the mesh over 8 fake CPU devices, one GPU host, or every
process's devices on a multi-host TPU pod (``jax.devices()`` is global after
:func:`sharding.initialize_distributed`).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from meditron_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
CONTEXT_AXIS = "context"
# Every axis a spec may name, in the mesh's order: `context` sits next to `tensor` (the
# fastest links carry the per-layer K/V gathers); a mesh has it only when its size is > 1.
ALL_AXES = ("data", "fsdp", CONTEXT_AXIS, "tensor")


def parse_mesh_spec(spec: str | dict | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": n/2, "tensor": 1}``.

    Omitted axes have size 1; one axis may be ``-1`` (the rest of the devices). An
    empty spec means ``fsdp=-1`` (all devices on one axis). ``context`` is in the result
    (between ``fsdp`` and ``tensor``) only when its size is above 1.
    """
    if isinstance(spec, dict):
        items = dict(spec)
    else:
        items = {}
        text = (spec or "").strip()
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in ALL_AXES:
                raise UserError(f"mesh spec {spec!r}: expected comma-separated AXIS=SIZE with "
                                f"AXIS in {', '.join(MESH_AXES)} or {CONTEXT_AXIS} (e.g. "
                                "data=2,fsdp=2,tensor=2)")
            if name in items:
                raise UserError(f"mesh spec {spec!r}: axis {name!r} given twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise UserError(f"mesh spec {spec!r}: size of {name!r} must be an integer "
                                f"or -1, got {value.strip()!r}") from None
        if not items:
            items = {"fsdp": -1}
    unknown = set(items) - set(ALL_AXES)
    if unknown:
        raise UserError(f"mesh axes {sorted(unknown)} unknown; use {', '.join(ALL_AXES)}")
    rest = [k for k, v in items.items() if v == -1]
    if len(rest) > 1:
        raise UserError(f"mesh spec {spec!r}: only one axis may be -1")
    if any(not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1
           for v in items.values()):
        raise UserError(f"mesh spec {spec!r}: sizes must be positive (or -1 for the rest)")
    fixed = math.prod(v for v in items.values() if v != -1)
    if fixed > num_devices:
        raise UserError(f"mesh spec {spec!r} needs {fixed} devices but only {num_devices} are "
                        "available; shrink the mesh or add devices (on CPU set XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N before starting)")
    if rest:
        if num_devices % fixed:
            raise UserError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by "
                            f"the fixed axes' product {fixed}; change the fixed sizes")
        items[rest[0]] = num_devices // fixed
    return {axis: int(items.get(axis, 1)) for axis in ALL_AXES
            if axis in MESH_AXES or items.get(axis, 1) > 1}


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over ``devices`` (default: every process's).

    Axis types are **Auto** on purpose: the model declares logical axes on weights and
    constrains activations only at layer boundaries; with Auto, XLA's sharding
    propagation places everything in between and inserts the collectives. Explicit
    axes (``jax.make_mesh``'s default since 0.10) would make every einsum's output
    sharding part of its type, so the model code would have to know the mesh, which
    the design forbids.

    Devices are laid out by ``jax.make_mesh`` (ICI rings on TPU, NVLink islands on
    GPU); on a multi-slice TPU job the ``data`` axis spans the slices, so only the
    data-parallel gradient all-reduce crosses the slow data-centre network.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    n = math.prod(sizes.values())
    names = tuple(sizes)
    shape = tuple(sizes.values())
    types = (AxisType.Auto,) * len(names)
    if n < len(devices) and len({d.process_index for d in devices}) > 1:
        raise UserError(f"mesh {spec!r} uses {n} of {len(devices)} devices; a multi-process "
                        "mesh must use every device (e.g. put -1 on one axis)")
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1 and n == len(devices):
        if sizes["data"] % len(slices):
            raise UserError(f"mesh {spec!r}: data={sizes['data']} must be a multiple of the "
                            f"{len(slices)} TPU slices (data parallelism spans the slices)")
        ici = (sizes["data"] // len(slices),) + shape[1:]
        dcn = (len(slices),) + (1,) * (len(shape) - 1)
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(array, names, axis_types=types)
    if n < len(devices) and devices[0].platform == "tpu":
        # A sub-mesh need not be a valid physical sub-slice: take devices in order.
        return Mesh(np.asarray(devices[:n], dtype=object).reshape(shape), names,
                    axis_types=types)
    return jax.make_mesh(shape, names, axis_types=types, devices=devices)


def mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """Size of every axis a rule may name (``context`` is 1 on a mesh without it)."""
    sizes = dict(mesh.shape)
    return {a: sizes.get(a, 1) for a in ALL_AXES} | sizes


def describe(mesh: Mesh | AbstractMesh) -> str:
    return ",".join(f"{k}={v}" for k, v in dict(mesh.shape).items())
