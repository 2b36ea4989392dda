"""Training under the faults users hit, each a one-line error or the right behaviour:
a second trainer on the same output_dir, an unusable output_dir, SFT data where nothing
fits, SIGTERM / Ctrl-C before there is a state and during the first step, a full disk
during a checkpoint and during the final save.

One tiny run (12 steps on one device, a checkpoint every 4) is the reference. The
faulted runs are the same program, compiled once (the persistent compilation cache is
shared with the child processes), so what they resume must equal it bitwise. A full
disk is a real one as far as the writers can tell: a child process lowers
RLIMIT_FSIZE (with SIGXFSZ ignored) right before the save, so every write past 200 KB
fails with EFBIG, in Orbax's background threads and tensorstore's C++ alike.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from meditron_jax import atomic
from cli.main import main
from meditron_jax.errors import UserError
from tests.train_support import (compilation_cache, losses, tiny_run, tiny_run_dict,
                                 to_overrides)
from train import setup
from train.checkpoints import Interrupted
from train.loop import run_training

ROOT = os.path.join(os.path.dirname(__file__), "..")
RUN = {"train": {"steps": 12, "mesh": "fsdp=1", "grad_accum": 1}, "checkpoint": {"every": 4}}
ERROR = "meditron-jax train: error: "


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses; the module's runs share its compiled program."""
    with compilation_cache(str(tmp_path_factory.mktemp("jax_cache"))):
        summary = run_training(tiny_run(tmp_path_factory.mktemp("reference"), **RUN))
        yield losses(summary["metrics"])


def _train_args(out, **sections) -> list[str]:
    raw = tiny_run_dict(out, **{**RUN, **sections})
    return ["train", *sum((["--set", s] for s in to_overrides(raw)), [])]


def _errors(stderr: str) -> list[str]:
    """stderr without the data warning every tiny run logs (the corpus has long documents)."""
    return [line for line in stderr.splitlines() if line and "train data: an example" not in line]


def _the_error(rc: int, stderr: str) -> str:
    """The message of a child's one-line error: exit 2, no traceback, nothing else."""
    assert rc == 2 and "Traceback" not in stderr, stderr[-3000:]
    [line] = _errors(stderr)
    assert line.startswith(ERROR), line
    return line[len(ERROR):]


# ---- output_dir ---------------------------------------------------------------------------
def test_a_second_trainer_on_the_same_output_dir_fails_at_once(tmp_path, capsys):
    """It used to run too: both exited 0 and the first run's checkpoints were gone."""
    out = tmp_path / "run"
    with atomic.locked(out):  # what the first trainer holds for its whole run
        assert main(_train_args(out)) == 2
    [line] = _errors(capsys.readouterr().err)
    assert line.startswith(f"{ERROR}{out} is being written by pid {os.getpid()} "), line
    assert os.listdir(out) == []  # nothing written


def test_an_output_dir_that_cannot_be_a_directory_is_one_line(tmp_path):
    taken = tmp_path / "file"
    taken.write_text("not a directory")
    for out, reason in ((taken, "File exists"), (taken / "run", "Not a directory")):
        with pytest.raises(UserError, match=rf"^output_dir {out}: {reason}$"):
            run_training(tiny_run(out, **RUN))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir(mode=0o555)
    with pytest.raises(UserError, match=rf"^output_dir {out}: not writable$"):
        run_training(tiny_run(out, **RUN))


# ---- data where nothing fits -------------------------------------------------------------------
def test_sft_data_where_no_prompt_fits_is_one_line(tmp_path, capsys):
    """The loader used to cycle such a file forever at 100% CPU, ignoring SIGTERM."""
    qa = tmp_path / "qa.jsonl"
    prompts = ["Which drug treats uncomplicated falciparum malaria in adults and children?",
               "What solution replaces fluids lost to cholera diarrhoea in a child?"]
    qa.write_text("".join(json.dumps({"prompt": p, "completion": " yes"}) + "\n" for p in prompts))
    out = tmp_path / "run"
    assert main(_train_args(out, data={"kind": "sft", "train_files": [str(qa)], "seq_len": 8,
                                       "overlong": "truncate"})) == 2
    [line] = _errors(capsys.readouterr().err)
    assert line.startswith(f"{ERROR}{qa}: no record has anything to train on within "
                           "data.seq_len=8 with data.overlong=truncate: every prompt fills the "
                           "row (longest prompt "), line
    assert not os.path.exists(out / "checkpoints")


# ---- signals -----------------------------------------------------------------------------
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_while_reading_data_stops_at_once(tmp_path, capsys, monkeypatch, sig, status):
    """Before there is a training state nothing is saved: the run stops where it is."""
    def make_data(*args):
        os.kill(os.getpid(), sig)  # as if it arrived while the files were being read
        raise AssertionError("the signal did not stop the run")
    monkeypatch.setattr(setup, "make_data", make_data)
    out = tmp_path / "run"
    # what the process had before (SIG_IGN for SIGINT when started as a background job)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert main(_train_args(out)) == status
    assert _errors(capsys.readouterr().err) == [
        f"train: stopped by {sig.name} before training started; nothing to save"]
    assert not os.path.exists(out / "checkpoints")
    with atomic.locked(out):  # released
        pass
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


def test_a_signal_during_the_first_step_saves_it(tmp_path, monkeypatch, reference):
    """Once there is a state, SIGINT arriving while step 1 runs (and compiles) saves step 1;
    the rerun goes on as the uninterrupted run."""
    import train.loop
    real = train.loop.jit_train_step

    def jit_train_step(*args):
        step = real(*args)

        def interrupted_step(state, batch):
            os.kill(os.getpid(), signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a 2nd Ctrl-C kills
            return step(state, batch)
        return interrupted_step
    monkeypatch.setattr(train.loop, "jit_train_step", jit_train_step)
    stopped = run_training(tiny_run(tmp_path, **RUN))
    assert (stopped["signal"], stopped["steps"], stopped["latest_checkpoint"]) == ("SIGINT", 1, 1)
    assert stopped["model"] is None
    monkeypatch.undo()
    resumed = run_training(tiny_run(tmp_path, **RUN))
    assert resumed["start_step"] == 1
    assert losses(resumed["metrics"]) == reference  # bitwise, steps 1..12 once each


def test_interrupted_is_raised_before_the_state_exists():
    from train.checkpoints import Preemption
    with Preemption() as p:
        with pytest.raises(Interrupted) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exc.value.signal == "SIGTERM" and p.reached(0)
    with Preemption() as p:
        p.arm()
        os.kill(os.getpid(), signal.SIGTERM)  # only noted: the loop saves after the step
        assert p.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ---- a full disk ----------------------------------------------------------------------------
CHILD = r"""
import json, os, resource, signal, sys, time
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
import meditron_jax.io.checkpoint
import train.checkpoints
from cli.main import main

check = train.checkpoints.Checkpointer.check

def check_after_the_write(self):  # as if each step outlasted the background write
    while self._mgr.is_saving_in_progress():
        time.sleep(0.01)
    check(self)

train.checkpoints.Checkpointer.check = check_after_the_write

owner, name = ((train.checkpoints.Checkpointer, "save") if sys.argv[2] == "checkpoint"
               else (meditron_jax.io.checkpoint, "save_params"))
real, calls = getattr(owner, name), []

def full_from_the_second_save(*args, **kwargs):
    calls.append(1)
    if len(calls) == (2 if sys.argv[2] == "checkpoint" else 1):
        # the final model's files are small (OCDBT may pack them under 200 KB): 20 KB
        limit = 200_000 if sys.argv[2] == "checkpoint" else 20_000
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return real(*args, **kwargs)

setattr(owner, name, full_from_the_second_save)
sys.exit(main(json.loads(sys.argv[3])))
"""


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, reference):
    """Two children at once: the disk fills during the checkpoint of step 8 (an async
    save), and during the final model save."""
    runs = {}
    try:
        for where in ("checkpoint", "final"):
            out = tmp_path_factory.mktemp(where)
            err = open(str(out) + ".err", "w+")
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, ROOT, where, json.dumps(_train_args(out))],
                stdout=subprocess.DEVNULL, stderr=err)
            runs[where] = (out, proc, err)
        results = {}
        for where, (out, proc, err) in runs.items():
            rc = proc.wait(timeout=400)
            err.seek(0)
            results[where] = (out, rc, err.read())
        yield results
    finally:
        for out, proc, err in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            err.close()


def test_disk_full_during_a_checkpoint_stops_at_once_with_one_line(disk_full):
    """It used to print 507 lines and train on until the next save. The step after the
    write failed stops it (here the step-8 one: the child lets each write end first)."""
    out, rc, err = disk_full["checkpoint"]
    ckpts = os.path.join(out, "checkpoints")
    line = _the_error(rc, err)
    assert line.startswith(f"checkpoint step 8 was not written: {ckpts}/8."), line
    assert line.endswith(": File too large; the last complete checkpoint is step 4 in "
                         f"{ckpts}, intact; free space (or fix the file system) and rerun the "
                         "same command to resume"), line
    assert max(r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))) == 8
    assert sorted(os.listdir(ckpts)) == ["4", "8.orbax-checkpoint-tmp"]  # 8 never committed


def test_rerun_after_a_full_disk_resumes_from_the_intact_checkpoint(disk_full, reference):
    out = disk_full["checkpoint"][0]
    resumed = run_training(tiny_run(out, **RUN))
    assert resumed["start_step"] == 4 and resumed["steps"] == 12
    assert losses(resumed["metrics"]) == reference  # bitwise, each step once
    assert sorted(os.listdir(out / "checkpoints")) == ["12", "8"]  # the partial 8 cleared


def test_disk_full_during_the_final_save_then_the_rerun_writes_it(disk_full, reference):
    """It used to print 318 lines; the rerun trains nothing and writes the final model."""
    out, rc, err = disk_full["final"]
    line = _the_error(rc, err)
    assert line.startswith(f"writing {out}/model: "), line
    assert line.endswith(": File too large; training itself is complete (the last complete "
                         f"checkpoint is step 12 in {out}/checkpoints): free space and rerun "
                         "the same command to write the final model"), line
    assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl", "tokenizer",
                                       "train_run.json"]  # no model, no partial one
    again = run_training(tiny_run(out, **RUN))
    assert again["start_step"] == again["steps"] == 12 and losses(again["metrics"]) == reference
    from meditron_jax.io.loading import load_model
    assert load_model(again["model"]).kind == "native"
