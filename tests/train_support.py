"""Shared pieces of the training tests: tiny run configs and a compilation cache.

Several tests run the same tiny program (in this process and in subprocesses that are
killed and resumed); JAX's persistent compilation cache lets them compile it once.
"""
from __future__ import annotations

import contextlib
import os

import jax

from train.config import from_dict

CORPUS = os.path.join(os.path.dirname(__file__), "..", "meditron_jax", "data",
                      "clinical_corpus.txt")
QA = os.path.join(os.path.dirname(__file__), "..", "meditron_jax", "data", "clinical_qa.jsonl")

_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compilation_cache(path: str):
    """Use a persistent compilation cache at ``path`` here and in child processes."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    old = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
    old_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    for k, v in zip(_CACHE_KEYS, (path, 0, 0)):
        jax.config.update(k, v)
    cc.reset_cache()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    try:
        yield path
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()
        if old_env is None:
            os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        else:
            os.environ["JAX_COMPILATION_CACHE_DIR"] = old_env


def tiny_run_dict(out: str, **sections) -> dict:
    """A tiny pretraining run on the bundled corpus (float32, no progress bar)."""
    raw = {
        "output_dir": str(out),
        "model": {"preset": "tiny", "compute_dtype": "float32", "remat": "full"},
        "data": {"train_files": [CORPUS], "tokenizer": "bpe:512", "seq_len": 32,
                 "packing_bins": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "decay": "cosine"},
        "train": {"steps": 20, "batch_size": 8, "grad_accum": 2, "mesh": "data=2,fsdp=2,tensor=2"},
        "checkpoint": {"every": 5, "keep": 2},
        "log": {"progress": False, "tensorboard": False, "plot": False, "every": 100},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


def tiny_run(out: str, **sections):
    return from_dict(tiny_run_dict(out, **sections))


def to_overrides(raw: dict, prefix: str = "") -> list[str]:
    """The same config as ``--set`` arguments (to start it as a CLI subprocess)."""
    import json
    out = []
    for k, v in raw.items():
        if isinstance(v, dict):
            out += to_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def losses(metrics_path: str) -> dict[int, float]:
    from train.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(metrics_path) if "loss" in r}
