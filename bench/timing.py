"""Timing helpers shared by every runner: warm-up excluded, medians of repeats."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    return [timed(fn) for _ in range(repeats)]


class Bench:
    """One benchmark on one side, driven by the parent one call at a time (so the two
    sides' timed runs can alternate): ``warm`` compiles / runs it once, ``once`` times
    one run and returns at least ``{"seconds": ...}``, ``finish`` adds the checks made
    on the last run's output (logits, greedy tokens, compilations)."""

    def warm(self) -> dict:
        raise NotImplementedError

    def once(self) -> dict:
        raise NotImplementedError

    def finish(self) -> dict:
        return {}


class KeepLast:
    """``fn`` that remembers its last result, so the output of the last timed run can
    be checked afterwards without running the workload once more."""

    def __init__(self, fn: Callable[[], object]):
        self.fn, self.last = fn, None

    def __call__(self):
        self.last = self.fn()
        return self.last


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(repeat_seconds(fn, repeats))


# Above this share of the pinned CPUs used by other processes, a timed run or probe is
# noise: it is measured again, and a row left with such runs is unreliable, never met.
MAX_OTHER_LOAD = 0.10


class OtherLoad:
    """How much of our CPUs other processes used while a measurement ran (0..1).

    The machine may be shared: from ``/proc/stat`` take the busy time of our pinned
    CPUs, subtract this process's own CPU time, and divide by wall time x CPUs. A
    value near 0 means the numbers are clean; above ``MAX_OTHER_LOAD`` they are
    disturbed. ``/proc/stat`` counts 10 ms ticks, so a run of well under a second
    (the ``tiny`` preset's) reads a few ticks' worth of noise either way.
    """

    def __init__(self):
        self.cpus = sorted(os.sched_getaffinity(0))
        self.value: float | None = None

    def _busy(self) -> float:
        ticks = 0
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if name[3:].isdigit() and int(name[3:]) in self.cpus:
                    user, nice, system, _, _, irq, softirq, steal = map(int, fields[:8])
                    ticks += user + nice + system + irq + softirq + steal
        return ticks / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherLoad":
        self._start = (time.perf_counter(), self._busy(), sum(os.times()[:2]))
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        other = (self._busy() - busy0) - (sum(os.times()[:2]) - own0)
        # /proc/stat counts 10 ms ticks: a run of a few ms can read above 1, so clip
        self.value = round(min(max(other, 0.0) / max(wall * len(self.cpus), 1e-9), 1.0), 3)


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) via jax.monitoring.

    ``mark()`` starts a new window; ``since_mark`` is what compiled after it, so a
    benchmark marks after its warm-up and reports any recompilation in the timed runs.
    """

    def __init__(self):
        from jax._src import dispatch  # the event name is not re-exported publicly
        import jax.monitoring

        self.count = 0
        self.seconds = 0.0
        self._marked = 0
        event_name = dispatch.BACKEND_COMPILE_EVENT

        def listener(event: str, duration: float, **_):
            if event == event_name:
                self.count += 1
                self.seconds += duration

        jax.monitoring.register_event_duration_secs_listener(listener)

    def mark(self) -> None:
        self._marked = self.count

    @property
    def since_mark(self) -> int:
        return self.count - self._marked
