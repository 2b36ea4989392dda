"""Whole runs: 1 vs 8 devices, and resume after SIGKILL / SIGTERM of a real subprocess.

One tiny 20-step run on 8 fake devices (data=2,fsdp=2,tensor=2, grad_accum=2) is the
reference. The killed runs are the same program (compiled once, shared through the
persistent compilation cache), so their resumed losses must be bitwise identical.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from meditron_jax.errors import UserError
from tests.train_support import compilation_cache, losses, tiny_run, tiny_run_dict, to_overrides
from train.loop import run_training


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))) as path:
        yield path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("reference")
    summary = run_training(tiny_run(out))
    return out, summary, losses(summary["metrics"])


def test_reference_run_artifacts(reference):
    out, summary, ref = reference
    assert sorted(ref) == list(range(1, 21)) and summary["steps"] == 20
    assert ref[20] < ref[1]
    assert summary["latest_checkpoint"] == 20
    assert sorted(os.listdir(os.path.join(out, "checkpoints")))[-2:] == ["15", "20"]  # keep=2


def test_rerunning_a_finished_run_trains_nothing(reference):
    out, _, ref = reference
    again = run_training(tiny_run(out))
    assert again["start_step"] == again["steps"] == 20 and again["final_loss"] == ref[20]
    assert losses(again["metrics"]) == ref


def test_one_device_matches_eight(reference, tmp_path):
    _, _, ref = reference
    one = run_training(tiny_run(tmp_path, train={"mesh": "fsdp=1"}))
    got = losses(one["metrics"])
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step


def _start(out, log_path):
    cmd = [sys.executable, "-m", "cli", "train", *sum(
        (["--set", s] for s in to_overrides(tiny_run_dict(out))), [])]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


def _wait_until(ready, what, log_path, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} before {what}:\n"
                                 f"{open(log_path).read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{open(log_path).read()[-3000:]}")


def _first_step(log_path):
    """The "train:" line: the signal arrives while the first step compiles."""
    return lambda: "train:" in open(log_path).read()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, reference):
    """Both victims run at once (they share the compiled program through the cache)."""
    runs = {}
    procs = []
    try:
        for name, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
            out = tmp_path_factory.mktemp(name)
            log_path = str(out) + ".log"
            proc, log = _start(out, log_path)
            procs.append((proc, log))
            runs[name] = (out, log_path, proc, sig)
        for name, (out, log_path, proc, sig) in runs.items():
            ckpt = os.path.join(out, "checkpoints", "10")
            _wait_until(lambda: os.path.isdir(ckpt), "checkpoint 10", log_path, proc)
            proc.send_signal(sig)  # mid-training, with the step-15 save not yet done
            proc.wait(timeout=120)
        yield {name: (out, log_path, proc.returncode) for name, (out, log_path, proc, _) in runs.items()}
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            log.close()


@pytest.mark.parametrize("name", ["sigkill", "sigterm"])
def test_resume_after_kill_is_bitwise_identical(interrupted, reference, name):
    out, log_path, rc = interrupted[name]
    log = open(log_path).read()
    stopped = max(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())
    assert 10 <= stopped < 20
    if name == "sigterm":
        assert rc == 0, log[-2000:]
        assert f"preempted (SIGTERM) at step {stopped}; checkpoint saved" in log
    else:
        assert rc == -signal.SIGKILL
        # the killed run's lock file is left behind; the kernel released its lock, so it
        # does not block the rerun below
        assert os.path.exists(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock"))
        assert stopped in (10, 15)  # the last complete periodic checkpoint
    resumed = run_training(tiny_run(out))
    assert resumed["start_step"] == stopped and resumed["steps"] == 20
    ref = reference[2]
    got = losses(resumed["metrics"])
    assert sorted(got) == list(range(1, 21))  # metrics.jsonl reads as one run
    assert [got[s] for s in range(stopped + 1, 21)] == [ref[s] for s in range(stopped + 1, 21)]


@pytest.mark.parametrize("sig,status,word", [(signal.SIGTERM, 0, "preempted"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_signal_saves_a_step_the_schedule_would_not(tmp_path, reference, sig, status, word):
    """With no periodic checkpoint due, SIGTERM (a preemption) or Ctrl-C during the first
    step's compilation alone must save step 1 (Ctrl-C used to exit 130 with every step
    since the last checkpoint lost)."""
    raw = tiny_run_dict(tmp_path, checkpoint={"every": 1000})
    cmd = [sys.executable, "-m", "cli", "train",
           *sum((["--set", s] for s in to_overrides(raw)), [])]
    log_path = str(tmp_path) + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until(_first_step(log_path), "the first step", log_path, proc)
            assert not os.listdir(os.path.join(tmp_path, "checkpoints"))
            proc.send_signal(sig)
            assert proc.wait(timeout=120) == status
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    out = open(log_path).read()
    assert f"train: {word} ({sig.name}) at step 1; checkpoint saved" in out, out[-2000:]
    assert f'"signal": "{sig.name}"' in out
    assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["1"]
    if sig == signal.SIGINT:  # the rerun goes on as the uninterrupted run did
        resumed = run_training(tiny_run(tmp_path, checkpoint={"every": 1000}))
        assert resumed["start_step"] == 1
        ref, got = reference[2], losses(resumed["metrics"])
        assert [got[s] for s in range(2, 21)] == [ref[s] for s in range(2, 21)]


def test_checkpoint_of_another_model_is_refused(reference):
    out = reference[0]
    with pytest.raises(UserError, match=r"different model \(intermediate_size: checkpoint 192 vs run 128"):
        run_training(tiny_run(out, model={"overrides": {"intermediate_size": 128}},
                              train={"steps": 25}))


def test_mesh_that_does_not_divide_the_batch(tmp_path):
    with pytest.raises(UserError, match=r"batch size 6 is not divisible by the data axes.* = 4"):
        run_training(tiny_run(tmp_path, train={"batch_size": 6, "grad_accum": 1}))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_malformed_data_stops_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        run_training(tiny_run(out, data={"train_files": [str(bad)], "tokenizer": "bpe:512"}))
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")
