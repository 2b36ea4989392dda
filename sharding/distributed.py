"""Multi-process start-up: ``jax.distributed.initialize`` from flags, environment, or
automatically on a Cloud TPU VM.

After it, ``jax.devices()`` lists every process's devices and one mesh spans them all
(:func:`sharding.make_mesh`). It must run before anything touches a JAX backend.
Cross-process collectives on CPU use gloo, jax 0.10's default
(``jax_cpu_collectives_implementation``), so nothing needs configuring for a CPU
cluster or the localhost test.
"""
from __future__ import annotations

import argparse
import glob
import os

import jax

from meditron_jax.errors import UserError

# Google's PCI vendor id: a TPU chip attached to this host (what libtpu looks for too).
_GOOGLE_PCI_VENDOR = "0x1ae0"


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` for a command's parser."""
    group = parser.add_argument_group("multi-process (omit on one host; automatic on TPU VMs)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="number of processes in the job (env JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's index, 0..N-1 (env JAX_PROCESS_ID)")


def initialize_from_args(args: argparse.Namespace) -> bool:
    return initialize_distributed(getattr(args, "coordinator", None),
                                  getattr(args, "num_processes", None),
                                  getattr(args, "process_id", None))


def on_tpu_vm() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           local_device_ids: list[int] | None = None,
                           timeout_s: int = 300) -> bool:
    """Join a multi-process job if this is one; returns whether JAX is now distributed.

    Settings come from the arguments, else ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``. Without a coordinator,
    ``MEDITRON_DISTRIBUTED=1`` asks JAX to detect the cluster itself (SLURM, Open MPI,
    Kubernetes, TPU pods), and on a Cloud TPU VM that is the default (pod slices and
    multi-slice jobs learn their peers from the TPU metadata);
    ``MEDITRON_DISTRIBUTED=0`` turns the automatic path off.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    auto = os.environ.get("MEDITRON_DISTRIBUTED", "")
    if auto not in ("", "0", "1"):
        raise UserError(f"MEDITRON_DISTRIBUTED={auto!r}: use 1 (detect the cluster) or 0 (off)")

    kwargs: dict = {"initialization_timeout": timeout_s}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if coordinator_address:
        _check_explicit(coordinator_address, num_processes, process_id)
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
        where = f"the coordinator at {coordinator_address}"
    elif num_processes is not None or process_id is not None:
        raise UserError("multi-process: --num-processes/--process-id need --coordinator "
                        "HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    elif auto == "1" or (auto == "" and on_tpu_vm()):
        where = "the cluster's coordinator (auto-detected)"
    else:
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as exc:  # JaxRuntimeError is a RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"multi-process start-up failed reaching {where} within {timeout_s}s "
                        f"({first[:200]}); start every process with the same coordinator "
                        "and process count, and process 0 first") from None
    return True


def _check_explicit(address: str, num_processes: int | None, process_id: int | None) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"coordinator {address!r}: expected HOST:PORT (e.g. 10.0.0.2:1234)")
    if num_processes is None or process_id is None:
        raise UserError("multi-process: --coordinator needs --num-processes and --process-id "
                        "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"multi-process: process id {process_id} is outside 0..{num_processes - 1}"
                        f" for --num-processes {num_processes}")
