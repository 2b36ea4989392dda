"""Two processes on localhost (``jax.distributed``, 4 CPU devices each, gloo) build one
8-device mesh, load the same checkpoint, run a forward pass and one train step, and get
the single-process results."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from sharding import make_mesh
from tests.multihost_support import run_processes
from tests.multihost_worker import run_case
from tests.sharding_cases import assert_close


@pytest.fixture(scope="module")
def two_process_results(tiny_hf_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multihost")
    run_processes("tests.multihost_worker", [tiny_hf_dir, str(out_dir / "out{i}.npz")], out_dir,
                  devices=4)
    return [dict(np.load(out_dir / f"out{i}.npz")) for i in range(2)]


def test_two_processes_match_one(two_process_results, tiny_hf_dir):
    reference = run_case(tiny_hf_dir, make_mesh("fsdp=1", devices=jax.devices()[:1]))
    for results in two_process_results:
        assert_close(results, reference)
