"""Shared test set-up: 8 fake CPU devices (before JAX starts) and tiny HF fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny Llama-3.1-architecture HF snapshot (single safetensors file)."""
    return hf_fixtures.make_hf_snapshot(tmp_path_factory.mktemp("tiny_hf"))


# ---- scheduling: the heaviest files first ------------------------------------------------
# `make test` gives each of two xdist workers one file at a time, in collection order
# (`--dist loadfile --no-loadscope-reorder`). A file that starts last finishes last, so the
# files that take longest (seconds in a fresh-clone run, set-up included) start first and
# the short ones fill in around them, as longest-first scheduling does; by default xdist
# orders files by their number of tests, which put the 3-4 minute kill-and-resume file
# (3 tests) and the demo (1 test) near the end.
HEAVIEST_FIRST = (
    "test_train_kill.py", "test_bench.py", "test_demo.py", "test_plan_tpu.py",
    "test_multihost_train.py", "test_quant_accuracy.py", "test_quant.py", "test_sweep.py",
    "test_multihost_sweep.py", "test_golden_real.py", "test_train_loop.py",
    "test_train_resume.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept
