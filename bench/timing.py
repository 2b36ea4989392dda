"""Timing helpers shared by every runner: warm-up excluded, medians of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    return [timed(fn) for _ in range(repeats)]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(repeat_seconds(fn, repeats))


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
