"""One process of the two-process sweep test (tests/test_multihost_sweep.py).

``python -m tests.multihost_sweep_worker COORDINATOR NUM_PROCESSES PROCESS_ID CASES RESULT``
joins the job, runs each ``meditron-jax`` command line of CASES (a JSON list of argument
lists) in order through :func:`cli.main.main`, as every process of a multi-host
sweep does, and writes each one's exit status and last line of stderr to RESULT (JSON).
One process runs them all, so the commands share its compiled executables.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

import jax

from cli import main as cli
from sharding import initialize_distributed


def main(argv: list[str]) -> int:
    coordinator, num_processes, process_id, cases, result = argv
    initialize_distributed(coordinator, int(num_processes), int(process_id), timeout_s=60)
    assert jax.process_count() == int(num_processes), jax.devices()
    with open(cases, encoding="utf-8") as f:
        commands = json.load(f)
    outcomes = []
    for command in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(command)
        sys.stderr.write(err.getvalue())
        outcomes.append([code, (err.getvalue().strip().splitlines() or [""])[-1]])
    with open(result, "w", encoding="utf-8") as f:
        json.dump(outcomes, f)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
