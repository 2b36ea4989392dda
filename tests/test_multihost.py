"""Two processes on localhost (``jax.distributed``, 4 CPU devices each, gloo) build one
8-device mesh, load the same checkpoint, run a forward pass and one train step, and get
the single-process results."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sharding import make_mesh
from tests.multihost_worker import run_case
from tests.sharding_cases import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tiny_hf_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    coordinator = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    try:
        for i in range(2):
            log = open(out_dir / f"worker{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.multihost_worker", coordinator, "2", str(i),
                 tiny_hf_dir, str(out_dir / f"out{i}.npz")],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    for i, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        assert proc.returncode == 0, f"worker {i} failed:\n{text[-3000:]}"
    return [dict(np.load(out_dir / f"out{i}.npz")) for i in range(2)]


def test_two_processes_match_one(two_process_results, tiny_hf_dir):
    reference = run_case(tiny_hf_dir, make_mesh("fsdp=1", devices=jax.devices()[:1]))
    for results in two_process_results:
        assert_close(results, reference)
