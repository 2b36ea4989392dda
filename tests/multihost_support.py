"""Starting a localhost ``jax.distributed`` job for the multi-process tests: free ports,
bounded waits, children killed whatever happens."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(module: str, args: list[str], log_dir, processes: int = 2,
                  devices: int = 2) -> None:
    """Run ``python -m MODULE COORDINATOR PROCESSES I *ARGS`` (``{i}`` in ARGS becomes I)
    for each process I of a localhost job on a free port, ``devices`` CPU devices each;
    every wait is bounded, leftovers are killed, a failed process's log is the error."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    coordinator = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    try:
        for i in range(processes):
            logs.append(open(os.path.join(log_dir, f"process{i}.log"), "w"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", module, coordinator, str(processes), str(i),
                 *(a.format(i=i) for a in args)],
                cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in logs:
            log.close()
    for i, proc in enumerate(procs):
        text = open(os.path.join(log_dir, f"process{i}.log")).read()
        assert proc.returncode == 0, f"process {i} failed:\n{text[-3000:]}"
