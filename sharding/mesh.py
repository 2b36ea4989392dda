"""One device mesh with named axes ``data``, ``fsdp``, ``tensor``, from a spec string.

The same function builds the mesh over 8 fake CPU devices, one GPU host, or every
process's devices on a multi-host TPU pod (``jax.devices()`` is global after
:func:`initialize_distributed`).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meditron_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str | dict | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": n/2, "tensor": 1}``.

    Omitted axes have size 1; one axis may be ``-1`` (the rest of the devices). An
    empty spec means ``fsdp=-1`` (all devices on one axis).
    """
    if isinstance(spec, dict):
        items = dict(spec)
    else:
        items = {}
        text = (spec or "").strip()
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES:
                raise UserError(f"mesh spec {spec!r}: expected comma-separated AXIS=SIZE with "
                                f"AXIS in {', '.join(MESH_AXES)} (e.g. data=2,fsdp=2,tensor=2)")
            if name in items:
                raise UserError(f"mesh spec {spec!r}: axis {name!r} given twice")
            try:
                items[name] = int(value)
            except ValueError:
                raise UserError(f"mesh spec {spec!r}: size of {name!r} must be an integer "
                                f"or -1, got {value.strip()!r}") from None
        if not items:
            items = {"fsdp": -1}
    unknown = set(items) - set(MESH_AXES)
    if unknown:
        raise UserError(f"mesh axes {sorted(unknown)} unknown; use {', '.join(MESH_AXES)}")
    rest = [k for k, v in items.items() if v == -1]
    if len(rest) > 1:
        raise UserError(f"mesh spec {spec!r}: only one axis may be -1")
    if any(v == 0 or v < -1 for v in items.values()):
        raise UserError(f"mesh spec {spec!r}: sizes must be positive (or -1 for the rest)")
    fixed = math.prod(v for v in items.values() if v != -1)
    if rest:
        if num_devices % fixed:
            raise UserError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by "
                            f"the fixed axes' product {fixed}")
        items[rest[0]] = num_devices // fixed
    total = math.prod(items.values())
    if total > num_devices:
        raise UserError(f"mesh spec {spec!r} needs {total} devices but only {num_devices} are "
                        "available; shrink the mesh or add devices (on CPU set XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N before starting)")
    return {axis: int(items.get(axis, 1)) for axis in MESH_AXES}


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh.

    Axis types are **Auto** on purpose: the model declares logical axes on weights and
    constrains activations only at layer boundaries; with Auto, XLA's sharding
    propagation (GSPMD / Shardy) places everything in between and inserts the
    collectives. Explicit axes would make every einsum's output sharding part of its
    type, so the model code would have to know the mesh, which the design forbids.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    n = math.prod(sizes.values())
    shape = tuple(sizes[a] for a in MESH_AXES)
    if n == len(devices) and devices[0].platform != "cpu":
        # Topology-aware placement (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                             devices=devices)
    array = np.asarray(devices[:n], dtype=object).reshape(shape)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def describe(mesh: Mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh_shape(mesh).items())


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> bool:
    """Start multi-host JAX when asked to; returns whether it initialized.

    Arguments win over the environment (``MEDITRON_COORDINATOR``,
    ``MEDITRON_NUM_PROCESSES``, ``MEDITRON_PROCESS_ID``; JAX itself also reads
    ``JAX_COORDINATOR_ADDRESS`` etc.). On a TPU pod or a SLURM / Open MPI cluster,
    calling ``jax.distributed.initialize()`` with no arguments auto-detects all of it:
    set ``MEDITRON_DISTRIBUTED=1``.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("MEDITRON_COORDINATOR")
    if num_processes is None and env.get("MEDITRON_NUM_PROCESSES"):
        num_processes = int(env["MEDITRON_NUM_PROCESSES"])
    if process_id is None and env.get("MEDITRON_PROCESS_ID"):
        process_id = int(env["MEDITRON_PROCESS_ID"])
    auto = env.get("MEDITRON_DISTRIBUTED") == "1"
    if not coordinator_address and not auto:
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise UserError("multi-host: --coordinator needs --num-processes and --process-id "
                        "(or MEDITRON_NUM_PROCESSES / MEDITRON_PROCESS_ID)")
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    return True
