"""One process of the two-process training test (tests/test_multihost_train.py).

``python -m tests.multihost_train_worker STALL MARKER train --set ...`` runs the
``meditron-jax`` command line in this process, which joins the job named by
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` as a user's
would. With ``STALL`` > 0 the process stops for good while fetching the batch of step
STALL + 1 (its own data loader, so every process stops in the same place) and creates
``MARKER``; the test then SIGKILLs the job mid-step, as a lost host or a scheduler does.
"""
from __future__ import annotations

import sys
import threading

from cli import main as cli
from train import data


def stall_before_batch(batch: int, marker: str) -> None:
    fetch, fetched = data.Loader.__next__, [0]

    def next_or_stall(self):
        fetched[0] += 1
        if fetched[0] == batch:
            open(marker, "w").close()
            threading.Event().wait()  # until the test kills the process
        return fetch(self)

    data.Loader.__next__ = next_or_stall


def main(argv: list[str]) -> int:
    stall, marker, *command = argv
    if int(stall):
        stall_before_batch(int(stall) + 1, marker)
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
