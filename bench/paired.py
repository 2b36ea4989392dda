"""Paired measurement: both sides alive at once, their timed runs alternating.

The benchmark box is a shared VM whose speed can drift by 2x within a minute
(bench/NOTES.md has the measurements). Timing one side's repeats and then the other's
lets that drift into the ratio. Here the parent keeps a transformers worker, our worker
and a small probe worker running, and for each repeat r of a benchmark times one run of
each side back to back (the order alternating between repeats), with a probe of the
machine's matmul and read speed between the pairs. The ratio is the median of the
per-pair ratios; a fraction of the ceiling divides each run by the probes taken around it.

Every timed run and probe reports the share of the pinned CPUs other processes used
meanwhile. A pair during which that exceeded ``timing.MAX_OTHER_LOAD`` (in either run
or the probes around them) is noise: it is measured again, up to ``remeasure`` extra
pairs per benchmark; the ``repeats`` least disturbed pairs are kept, and a row still
holding a disturbed one is reported unreliable (``bench/report.py``).

A benchmark whose two sides do not fit in memory together (``medium`` training) runs
each side alone in a fresh worker, the probes still between its repeats, and is
marked ``paired: false``.
"""
from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

from bench.presets import BenchPreset, peak_gib_estimate
from bench.timing import MAX_OTHER_LOAD
from meditron_jax.errors import UserError


# Pause before each timed run or probe: a side that just ran may still spin its worker
# threads (OpenMP, XLA's pool) for a moment, which would steal CPU from the next one.
SETTLE_S = 0.3


class WorkerFailed(UserError):
    """A worker process failed or timed out (its output tail is printed)."""


class Served:
    """A long-lived ``bench.worker`` process spoken to in JSON lines over its
    stdin/stdout; its stderr goes to a log file whose tail is shown on failure."""

    def __init__(self, kind: str, args, workdir: str, timeout: float, **opts):
        self.kind, self.timeout = kind, timeout
        self.log_path = os.path.join(workdir, f"{kind}-{opts.get('preset', 'machine')}.log")
        cmd = [sys.executable, "-m", "bench.worker", kind, "--threads", str(args.threads),
               "--seed", str(args.seed)]
        for key, value in opts.items():
            cmd += [f"--{key}", str(value)]
        print(f"bench: {kind} {opts.get('preset', '')}".rstrip(), file=sys.stderr, flush=True)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self._reply("start")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of stream: the worker exited

    def _fail(self, why: str) -> WorkerFailed:
        self.kill()
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = "\n".join(f.read().strip().splitlines()[-15:])
        except OSError:
            tail = ""
        if tail:
            print(tail, file=sys.stderr)
        return WorkerFailed(f"the {self.kind} worker {why}")

    def _reply(self, what: str) -> dict:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            raise self._fail(f"did not answer {what} within --worker-timeout="
                             f"{self.timeout:g}s") from None
        if line is None:
            code = self.proc.wait()
            raise self._fail(f"failed (exit {code}) during {what}; its last output is "
                             "printed above")
        reply = json.loads(line)
        if "error" in reply:
            raise self._fail(f"failed during {what}: {reply['error']}")
        return reply

    def call(self, op: str, bench: str | None = None) -> dict:
        if op in ("once", "probe"):
            time.sleep(SETTLE_S)
        try:
            self.proc.stdin.write(json.dumps({"op": op, "bench": bench}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the reply read below reports the exit
        return self._reply(f"{op} {bench or ''}".strip())

    def close(self) -> dict:
        """Ask the worker to exit; its last line reports its peak RSS."""
        try:
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.close()
            final = self._reply("exit")
            self.proc.wait(timeout=60)
        finally:
            self.kill()
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# Benchmarks whose two sides each run alone (their own worker, probes between repeats),
# never in back-to-back pairs: a step right after the other side's freed gigabytes ran
# up to 1.6x slower (fresh memory the VM had handed back to its host; bench/NOTES.md
# section 21 has the measurements). Running alone also gives training fresh workers: its
# step changes transformers' weights and consumes our loaded parameters, which the
# paired benchmarks share.
NEVER_PAIRED = ("train",)


def pair_fits(p: BenchPreset, bench: str, free_gib: float) -> bool:
    """Both sides' estimated peaks (and the probe's ~0.5 GiB) fit what is free now."""
    return 2 * peak_gib_estimate(p, bench) + 0.5 <= free_gib


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(warm: dict, runs: list[dict], finish: dict, remeasured: int) -> dict:
    """One side's raw result: medians of its timed runs plus warm-up and checks, each
    run's other-process load and how many runs were measured again."""
    out = {**warm, **finish, "seconds_all": [r["seconds"] for r in runs],
           "seconds": _median([r["seconds"] for r in runs]),
           "other_load_runs": [r["other_load"] for r in runs], "remeasured": remeasured}
    for key in ("ttft_s", "total_s"):
        if runs and key in runs[0]:
            out[key] = _median([r[key] for r in runs])
    return out


def timed_runs(attempt: Callable[[int], dict], repeats: int, remeasure: int,
               probe: Served) -> tuple[dict, list[dict], int]:
    """``attempt(i)`` (one timed run per side, by side name) with a probe before and
    after each, until ``repeats`` attempts ran clean (other processes used at most
    ``MAX_OTHER_LOAD`` of the pinned CPUs in every run and probe around them) or
    ``remeasure`` extra attempts were spent. Keeps the ``repeats`` least disturbed
    attempts, in order: (side -> runs, the probes around each, attempts dropped)."""
    probes, attempts = [probe.call("probe")], []

    def load(i: int) -> float:
        return max([r["other_load"] for r in attempts[i].values()]
                   + [probes[i]["other_load"], probes[i + 1]["other_load"]])
    clean = 0
    while clean < repeats and len(attempts) < repeats + remeasure:
        attempts.append(attempt(len(attempts)))
        probes.append(probe.call("probe"))
        clean += load(len(attempts) - 1) <= MAX_OTHER_LOAD
    by_load = sorted(range(len(attempts)), key=load)  # stable: earlier first on ties
    keep = sorted(by_load[:repeats])
    windows = around(probes)
    return ({side: [attempts[i][side] for i in keep] for side in attempts[0]},
            [windows[i] for i in keep], len(attempts) - len(keep))


def run_paired(bench: str, repeats: int, remeasure: int, theirs: Served, ours: Served,
               probe: Served) -> tuple:
    """Warm both sides, then ``repeats`` back-to-back pairs with probes between them
    (a disturbed pair measured again, up to ``remeasure`` times)."""
    warm_t, warm_o = theirs.call("warm", bench), ours.call("warm", bench)

    def pair(i: int) -> dict:
        order = (theirs, ours) if i % 2 == 0 else (ours, theirs)
        return {side.kind: side.call("once", bench) for side in order}
    runs, during, dropped = timed_runs(pair, repeats, remeasure, probe)
    theirs_result = summarize(warm_t, runs["transformers"], theirs.call("finish", bench),
                              dropped)
    ours_result = summarize(warm_o, runs["ours"], ours.call("finish", bench), dropped)
    ours_result["matmul"] = ours.ready.get("matmul")
    return ours_result, theirs_result, during, during  # both ran between the same probes


def run_alone(bench: str, repeats: int, remeasure: int, start: Callable[[], Served],
              probe: Served) -> tuple:
    """One side in a fresh worker of its own, probes between its repeats."""
    side = start()
    try:
        warm = side.call("warm", bench)
        runs, during, dropped = timed_runs(lambda i: {"side": side.call("once", bench)},
                                           repeats, remeasure, probe)
        result = summarize(warm, runs["side"], side.call("finish", bench), dropped)
        result["matmul"] = side.ready.get("matmul")
        result["peak_rss_gb"] = side.close().get("peak_rss_gb")
    finally:
        side.kill()
    return result, during


def around(probes: list[dict]) -> list[dict]:
    """The machine's speed during run r: the mean of the probes before and after it;
    and the larger of their other processes' loads."""
    return [{"matmul_gflops": (a["matmul_gflops"] + b["matmul_gflops"]) / 2,
             "read_gbps": (a["read_gbps"] + b["read_gbps"]) / 2,
             "other_load": max(a["other_load"], b["other_load"])}
            for a, b in zip(probes, probes[1:])]
