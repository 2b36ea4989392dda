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
