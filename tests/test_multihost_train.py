"""Two processes (``jax.distributed`` on localhost, gloo, 4 CPU devices each, one
``data=2,fsdp=2,tensor=2`` mesh) train, are SIGKILLed mid-step after a checkpoint, are
restarted, resume from the checkpoint with two processes and finish: every step's loss
and the final weights equal a one-process run on the same logical mesh (8 devices) fed
the same global batches, and metrics.jsonl holds every step once.

Each process reads only its share of the records (record ``i`` goes to process
``i % 2``), so process 1 packs other examples than process 0 and its data position in a
checkpoint is its own. The one-process reference reads both shares side by side.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from meditron_jax.errors import UserError
from tests.multihost_support import free_port
from tests.test_train_kill import TIMING_KEYS, data_positions, native_arrays
from tests.train_support import QA, tiny_run_dict, to_overrides
from train import setup
from train.config import from_dict
from train.data import Loader, read_records
from train.loop import run_training
from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
STEPS, EVERY, STALL = 6, 2, 5   # killed fetching step 6's batch ...
RESUME = STALL - STALL % EVERY    # ... resumes from step 4's checkpoint
TIMEOUT_S = 300
FLOATS = ("loss", "grad_norm")


def _run_dict(out) -> dict:
    return tiny_run_dict(out, data={"kind": "sft", "train_files": [QA], "seq_len": 32},
                         train={"steps": STEPS}, checkpoint={"every": EVERY, "keep": 2},
                         log={"every": 1, "cpu_peak_flops": 1e9})


class HostsLoader:
    """One process reading what each of ``n`` processes reads, in process order: the
    global batch of an ``n``-process run (process ``i`` holds rows ``i*local:(i+1)*local``
    of the batch axis)."""

    def __init__(self, run, tok, eos: int, n: int):
        local = run.train.batch_size // n
        self.hosts = [Loader(read_records(run.data.train_files, run.data, i, n), tok, eos,
                             run.data, local) for i in range(n)]

    def __next__(self) -> dict:
        batches = [next(h) for h in self.hosts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    @property
    def counts(self) -> dict:
        return self.hosts[0].counts  # what process 0 (the one writing metrics) counts

    def report(self) -> str | None:
        return self.hosts[0].report()

    def get_state(self) -> dict:
        return {"hosts": [h.get_state() for h in self.hosts]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "make_data", lambda run, tok, eos, tok_dir=None: setup.Data(
            HostsLoader(run, tok, eos, PROCESSES), [], run.train.batch_size))
        run_training(from_dict(_run_dict(out)))
    return str(out)


def _start(out: str, stall: int, log_dir, cache: str) -> list[subprocess.Popen]:
    """The training command on each process of a localhost job (free port)."""
    overrides = [a for s in to_overrides(_run_dict(out)) for a in ("--set", s)]
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(PROCESSES):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COORDINATOR_ADDRESS=coordinator,
                   JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(i),
                   JAX_COMPILATION_CACHE_DIR=cache)
        env.pop("JAX_NUM_CPU_DEVICES", None)
        with open(os.path.join(log_dir, f"{'stalled' if stall else 'resumed'}{i}.log"), "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.multihost_train_worker", str(stall),
                 os.path.join(log_dir, f"process{i}.stalled"), "train", *overrides],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    return procs


def _kill(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Run 1 trains until both processes hang fetching step STALL+1's batch (after step
    EVERY's checkpoint is committed) and is SIGKILLed; run 2 resumes and finishes."""
    tmp = tmp_path_factory.mktemp("two_processes")
    out, cache, procs = str(tmp / "run"), str(tmp / "jax_cache"), []
    committed = os.path.join(out, "checkpoints", str(RESUME))
    try:
        procs = _start(out, STALL, tmp, cache)
        deadline = time.monotonic() + TIMEOUT_S
        while not (os.path.isdir(committed) and
                   all(os.path.exists(tmp / f"process{i}.stalled") for i in range(PROCESSES))):
            for i, proc in enumerate(procs):
                assert proc.poll() is None, \
                    f"process {i} ended early:\n{(tmp / f'stalled{i}.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the stall"
            time.sleep(0.05)
        _kill(procs)
        killed_steps = [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))]
        procs = _start(out, 0, tmp, cache)
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill(procs)
    logs = [(tmp / f"resumed{i}.log").read_text() for i in range(PROCESSES)]
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
    return out, killed_steps, logs[0]


def test_killed_run_resumes_from_its_checkpoint(two_processes):
    out, killed_steps, log = two_processes
    assert killed_steps == list(range(1, STALL + 1))  # step 5 was trained, not saved
    assert f"resuming from step {RESUME}" in log
    metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))


def test_two_processes_equal_one(two_processes, one_process):
    out = two_processes[0]
    got = {r["step"]: r for r in read_metrics(os.path.join(out, "metrics.jsonl"))}
    ref = {r["step"]: r for r in read_metrics(os.path.join(one_process, "metrics.jsonl"))}
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step, r in ref.items():
        assert sorted(got[step]) == sorted(r)
        for key in set(r) - set(TIMING_KEYS):  # FLOATS: sums over two processes
            assert got[step][key] == (pytest.approx(r[key], rel=1e-6) if key in FLOATS
                                      else r[key]), (step, key)
    a, b = (native_arrays(os.path.join(p, "model")) for p in (out, one_process))
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_each_process_keeps_its_own_data_position(two_processes, one_process):
    """Process 1's position is not process 0's (so resuming from the wrong one shows in
    the losses), and each process's file holds its own, as one process reading both
    shares has them."""
    out = two_processes[0]
    for step in (RESUME, STEPS):
        ckpt = os.path.join("checkpoints", str(step))
        ref = data_positions(os.path.join(one_process, ckpt))["process_0-of-1.json"]["hosts"]
        assert ref[0]["grain"] != ref[1]["grain"]
        assert data_positions(os.path.join(out, ckpt)) == {
            f"process_{i}-of-{PROCESSES}.json": ref[i] for i in range(PROCESSES)}


def test_resuming_with_another_process_count_is_refused(two_processes, tmp_path):
    out = shutil.copytree(two_processes[0], tmp_path / "run")
    with pytest.raises(UserError, match=r"data: no process_0-of-1\.json \(it holds "
                       r"process_0-of-2\.json, process_1-of-2\.json\); resume with as many"):
        run_training(from_dict(_run_dict(out)))
