"""One process of the localhost multi-process test (tests/test_multihost.py).

``python -m tests.multihost_worker COORDINATOR NUM_PROCESSES PROCESS_ID SNAPSHOT OUT``
joins the job, builds one mesh over every process's devices, loads the snapshot
straight into its shardings, runs :func:`tests.sharding_cases.forward_and_step` and
writes the gathered results to OUT (.npz).
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from meditron_jax.io.loading import load_model
from sharding import TRAIN_RULES, initialize_distributed, make_mesh, param_shardings
from tests.sharding_cases import forward_and_step

MESH = "data=2,fsdp=2,tensor=2"


def run_case(path: str, mesh) -> dict[str, np.ndarray]:
    model = load_model(path, shardings=lambda cfg: param_shardings(cfg, mesh, TRAIN_RULES))
    return forward_and_step(model.cfg, model.params, mesh, TRAIN_RULES)


def main(argv: list[str]) -> int:
    coordinator, num_processes, process_id, path, out = argv
    initialize_distributed(coordinator, int(num_processes), int(process_id), timeout_s=60)
    assert jax.process_count() == 2 and len(jax.local_devices()) == 4, jax.devices()
    results = run_case(path, make_mesh(MESH))
    np.savez(out, **results)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
