"""Training SIGKILLed at real moments and rerun to the end ends where an uninterrupted run
ends: the same final weights (the native ``model/`` and the last Orbax step: params,
optimizer state and data position, every array bitwise), a metrics.jsonl holding every
step once with the same values, and no leftover file.

Every run is the real CLI (``python -m cli train``: SFT on the bundled Q&A
pairs, packed, a checkpoint every step) in its own process group; a kill is SIGKILL to
the whole group, as when a host dies. The moments:

- random moments: a delay drawn from a seeded RNG, alternately over the measured wall
  time of a whole uninterrupted run (start-up, data loading, compilation, steps, async
  saves and the final save are hit in proportion to how long they last) and over its
  training part (from the "train:" line, which comes just before the first step);
- targeted moments, from what can be observed outside the process: the output dir
  appearing (reading data, training the tokenizer), the "train:" line (compiling the
  first step, for real: the compilation cache is still cold), an Orbax
  ``N.orbax-checkpoint-tmp`` directory made by this run (an async save in flight; the
  first, then the second of a run) and ``.model.partial`` (the final save; twice in a row).

Kills are chained on one output dir (kill, rerun, kill again, ... until a run ends by
itself), two chains at a time, all sharing one persistent compilation cache. Where each
kill landed is printed (``pytest -s``). About 2 minutes on 2 cores (~45 runs).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meditron_jax.io.checkpoint import restore_params
from tests.train_support import QA, tiny_run_dict, to_overrides

STEPS = 6
RANDOM_KILLS = 20
SEED = 2121
TIMEOUT_S = 300           # one run, killed or not
POLL_S = 0.01
TIMING_KEYS = ("tokens_per_s", "mfu")   # the only metrics that may differ between runs
FIRST_STEP = "train:"     # the line printed just before the first step (and its compilation)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_CKPT = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _args(out: str) -> list[str]:
    raw = tiny_run_dict(out, data={"kind": "sft", "train_files": [QA], "seq_len": 32},
                        train={"steps": STEPS}, checkpoint={"every": 1, "keep": 2},
                        log={"every": 1, "cpu_peak_flops": 1e9})  # (no MFU probe at start)
    return [sys.executable, "-m", "cli", "train",
            *itertools.chain.from_iterable(("--set", s) for s in to_overrides(raw))]


@dataclasses.dataclass
class Watch:
    """What a trigger sees of a running process: its log, and the files it has written
    since it started (a killed run's leftovers are not this run's)."""
    out: str
    log_path: str
    start: float = dataclasses.field(default_factory=time.monotonic)
    since: float = dataclasses.field(default_factory=time.time)
    log: str = ""
    first_step_at: float | None = None  # seconds from the start to the "train:" line
    saves: set = dataclasses.field(default_factory=set)  # steps this run started saving

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def poll(self) -> None:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            self.log = f.read()
        if self.first_step_at is None and FIRST_STEP in self.log:
            self.first_step_at = self.elapsed
        self.saves.update(self.saving())

    def fresh(self, path: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return os.stat(os.path.join(self.out, path)).st_mtime >= self.since
        return False

    def saving(self) -> list[int]:
        """Steps whose async save (this run's) is in flight."""
        with contextlib.suppress(FileNotFoundError):
            names = os.listdir(os.path.join(self.out, "checkpoints"))
            return sorted(int(m.group(1)) for n in names if (m := TMP_CKPT.match(n))
                          and self.fresh(os.path.join("checkpoints", n)))
        return []

    def moment(self) -> str:
        """Where the process is, from its log and files (read just before the kill)."""
        steps = re.findall(r"^step (\d+) ", self.log, re.M)
        if self.fresh(".model.partial"):
            where = "final save"
        elif self.fresh("model"):
            where = "after the final save"
        elif steps:
            where = f"after step {steps[-1]}"
        elif FIRST_STEP in self.log:
            where = "first step (trace, compile)"
        elif self.fresh("train_run.json"):
            where = "restoring or initialising the state"
        elif self.fresh(f"../.{os.path.basename(self.out)}.lock"):  # output dir claimed
            where = "reading data, training the tokenizer"
        else:
            where = "start-up (imports, config)"
        saving = self.saving()
        if saving and "final" not in where:
            where += f", saving step {saving[-1]}"
        return f"{self.elapsed:5.2f}s {where}"


@dataclasses.dataclass
class Run:
    out: str
    returncode: int
    seconds: float
    first_step_at: float | None
    trigger: str
    moment: str | None  # where the kill landed; None if the run ended by itself

    def __str__(self) -> str:
        return (f"{os.path.basename(self.out):>10} {self.trigger:<36} "
                f"{self.moment or 'ran to the end in %.1fs' % self.seconds}")


def _killpg(proc) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just ended by itself
        os.killpg(proc.pid, signal.SIGKILL)


class Launcher:
    """Starts CLI runs and kills them on a trigger; every child is killed in ``close``."""

    def __init__(self, logs: str, cache: str):
        self.logs, self.live, self.ids = logs, set(), itertools.count()
        self.lock = threading.Lock()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT,
                    "JAX_COMPILATION_CACHE_DIR": cache,
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def run(self, out: str, name: str = "to the end", trigger=None) -> Run:
        """Run on ``out`` until it ends, or SIGKILL it once ``trigger(watch)`` is true."""
        log_path = os.path.join(self.logs, f"run{next(self.ids):03d}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(_args(out), cwd=ROOT, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        with self.lock:
            self.live.add(proc)
        w, landed = Watch(out, log_path), None
        try:
            while proc.poll() is None and w.elapsed < TIMEOUT_S:
                w.poll()
                if trigger is not None and trigger(w):
                    landed = w.moment()
                    _killpg(proc)
                    break
                time.sleep(POLL_S)
            rc = proc.wait(timeout=max(1.0, TIMEOUT_S - w.elapsed))
        finally:
            self._kill(proc)
        w.poll()
        assert rc in (0, -signal.SIGKILL), f"{out}: exit {rc}\n{w.log[-3000:]}"
        run = Run(out, rc, w.elapsed, w.first_step_at, name,
                  landed if rc == -signal.SIGKILL else None)
        print(run, flush=True)
        return run

    def _kill(self, proc) -> None:
        if proc.poll() is None:
            _killpg(proc)
            proc.wait(timeout=30)
        with self.lock:
            self.live.discard(proc)

    def close(self) -> None:
        for proc in list(self.live):
            self._kill(proc)


def chain(launcher: Launcher, out: str, triggers, finish: bool = True):
    """Rerun on ``out``, killing each run at the next ``(name, trigger)``, until one ends
    by itself; once the triggers run out, a last run goes to the end (if ``finish``)."""
    for name, trigger in itertools.chain(triggers, [("to the end", None)] if finish else []):
        run = launcher.run(out, name, trigger)
        yield run
        if run.returncode == 0:
            return


# ---- triggers -----------------------------------------------------------------------------
def after(seconds: float):
    return f"{seconds:5.2f}s after the start", lambda w: w.elapsed >= seconds


def into_training(seconds: float):
    return (f"{seconds:5.2f}s after the '{FIRST_STEP}' line",
            lambda w: w.first_step_at is not None and w.elapsed >= w.first_step_at + seconds)


TARGETED = [
    ("output dir appears (data loading)", lambda w: os.path.isdir(w.out)),
    ("1s into compiling the first step", into_training(1.0)[1]),
    ("first async save in flight", lambda w: len(w.saves) >= 1 and bool(w.saving())),
    ("second async save in flight", lambda w: len(w.saves) >= 2 and bool(w.saving())),
    ("final save in flight", lambda w: w.fresh(".model.partial")),
    ("final save in flight, again", lambda w: w.fresh(".model.partial")),
]


# ---- what a finished run left -------------------------------------------------------------
def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def orbax_tree(directory: str):
    """An Orbax PyTree checkpoint, read onto one device."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(directory).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
        return ckptr.restore(directory, target)


def native_arrays(path: str) -> dict[str, np.ndarray]:
    return _flat(restore_params(path)[1], "model")


def data_positions(step_dir: str) -> dict[str, dict]:
    """Each process's data position in a checkpoint step (``data/process_I-of-N.json``)."""
    data, out = os.path.join(step_dir, "data"), {}
    for name in os.listdir(data):
        if name.endswith(".json"):
            with open(os.path.join(data, name), encoding="utf-8") as f:
                out[name] = json.load(f)
    return out


def final_state(out: str) -> dict:
    """The final native model, the last Orbax step (arrays and data position), the
    metrics and the names of the files a finished run leaves."""
    last = os.path.join(out, "checkpoints", str(STEPS))
    arrays = native_arrays(os.path.join(out, "model"))
    for item in ("params", "opt"):
        arrays.update(_flat(orbax_tree(os.path.join(last, item)), item))
    data = data_positions(last)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]  # every line whole
    parent, name = os.path.split(out)
    files = sorted(os.listdir(out)) + sorted(f"checkpoints/{n}" for n in os.listdir(
        os.path.join(out, "checkpoints"))) + sorted(  # and beside it: locks, staging dirs
            n for n in os.listdir(parent) if n == name or n.startswith(f".{name}."))
    return {"arrays": arrays, "data": data, "metrics": metrics,
            "files": [f.replace(name, "OUT") for f in files]}


def assert_same_run(got: dict, ref: dict, where: str) -> None:
    assert got["files"] == ref["files"], f"{where}: leftovers or missing files"
    assert [r["step"] for r in got["metrics"]] == list(range(1, STEPS + 1)), where
    for a, b in zip(got["metrics"], ref["metrics"]):
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in b.items() if k not in TIMING_KEYS}, where
    assert got["data"] == ref["data"], where
    assert sorted(got["arrays"]) == sorted(ref["arrays"]), where
    for name, value in ref["arrays"].items():
        assert got["arrays"][name].dtype == value.dtype, (where, name)
        assert np.array_equal(got["arrays"][name], value), f"{where}: {name} differs"


# ---- the runs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    """1. the reference run (cold compile) beside the targeted chain's first two kills;
    2. a second uninterrupted run (warm cache; its timing spans the random delays) beside
    the rest of the targeted chain; 3. two lanes of random chains until RANDOM_KILLS kills
    have landed."""
    tmp = tmp_path_factory.mktemp("train_kill")
    launcher = Launcher(str(tmp), str(tmp / "jax_cache"))
    landed, lock = [0], threading.Lock()
    t0 = time.monotonic()

    def targeted(triggers, finish) -> list[Run]:
        return list(chain(launcher, str(tmp / "targeted"), iter(triggers), finish))

    def random_lane(lane: int) -> list[list[Run]]:
        rng, chains = random.Random(SEED + lane), []

        def triggers():
            for i in itertools.count():
                with lock:
                    if landed[0] >= RANDOM_KILLS:
                        return
                yield (after(rng.uniform(0.0, again.seconds)) if i % 2 else
                       into_training(rng.uniform(0.0, again.seconds - again.first_step_at)))

        try:
            while landed[0] < RANDOM_KILLS:
                chains.append([])
                for run in chain(launcher, str(tmp / f"random{lane}_{len(chains)}"), triggers()):
                    chains[-1].append(run)
                    with lock:
                        landed[0] += run.moment is not None
        except BaseException:
            landed[0] = RANDOM_KILLS  # the other lane stops too
            raise
        return chains

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            head = pool.submit(targeted, TARGETED[:2], False)
            reference = launcher.run(str(tmp / "reference"))
            head = head.result()
            tail = pool.submit(targeted, TARGETED[2:], True)
            again = launcher.run(str(tmp / "again"))
            tail = tail.result()
            lanes = [pool.submit(random_lane, lane) for lane in range(2)]
            random_chains = [c for lane in lanes for c in lane.result()]
    finally:
        launcher.close()
    summary = {"reference_s": round(reference.seconds, 1), "span_s": round(again.seconds, 1),
               "first_step_at_s": round(again.first_step_at, 1),
               "total_s": round(time.monotonic() - t0, 1), "random_kills": landed[0]}
    print(f"\n{json.dumps(summary)}")
    for run in itertools.chain(head, tail, *random_chains):
        print(run)
    return {"reference": reference, "again": again, "targeted": head + tail,
            "random": random_chains}


@pytest.fixture(scope="module")
def reference_state(kills):
    return final_state(kills["reference"].out)


def test_two_uninterrupted_runs_are_bitwise_equal(kills, reference_state):
    """Cold and warm compilation cache, each beside other runs: the baseline."""
    assert_same_run(final_state(kills["again"].out), reference_state, "second run")
    assert reference_state["metrics"][-1]["loss"] < reference_state["metrics"][0]["loss"]


def test_targeted_kills_resume_bitwise(kills, reference_state):
    runs = kills["targeted"]
    assert [r.trigger for r in runs] == [name for name, _ in TARGETED] + ["to the end"]
    assert all(r.moment is not None for r in runs[:-1]), [str(r) for r in runs]
    assert_same_run(final_state(runs[-1].out), reference_state, "targeted kills")


def test_random_kills_resume_bitwise(kills, reference_state):
    chains = kills["random"]
    assert sum(r.moment is not None for runs in chains for r in runs) >= RANDOM_KILLS
    for runs in chains:
        assert_same_run(final_state(runs[-1].out), reference_state, runs[-1].out)
