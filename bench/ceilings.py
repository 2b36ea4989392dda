"""The machine's own limits: float32 matmul throughput and memory read bandwidth.

Each is measured with every library the benchmark uses (XLA through JAX, PyTorch,
NumPy's BLAS) and the ceiling is the best median among them: a fraction of the ceiling
is then a fraction of what this machine demonstrably does, not of a datasheet number.
"""
from __future__ import annotations

import numpy as np

from bench.timing import OtherLoad, median_seconds

MATMUL_N = 3072             # large enough that every library reaches its plateau on CPU
READ_BYTES = 512 * 2 ** 20  # 16x the L3 cache of the benchmark machine: a DRAM read


def _matmul_libs(n: int):
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jdot = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {"xla": lambda: jdot(ja, jb).block_until_ready(),
            "torch": lambda: torch.matmul(ta, tb),
            "numpy": lambda: a @ b}


def _read_libs(nbytes: int):
    import jax
    import jax.numpy as jnp
    import torch

    x = np.ones(nbytes // 4, np.float32)
    jx = jnp.asarray(x)
    jsum = jax.jit(jnp.sum)
    tx = torch.from_numpy(x)
    return {"xla": lambda: jsum(jx).block_until_ready(),
            "torch": lambda: tx.sum(),
            "numpy": lambda: x.sum()}


def measure(repeats: int = 5, matmul_n: int = MATMUL_N, read_bytes: int = READ_BYTES) -> dict:
    """Medians per library and the best of them, as the JSON ``ceilings`` entry."""
    flops = 2.0 * matmul_n ** 3
    with OtherLoad() as load:
        matmul = {lib: flops / median_seconds(fn, repeats) / 1e9
                  for lib, fn in _matmul_libs(matmul_n).items()}
        read = {lib: read_bytes / median_seconds(fn, max(repeats, 10)) / 1e9
                for lib, fn in _read_libs(read_bytes).items()}
    return {"matmul_gflops": max(matmul.values()), "read_gbps": max(read.values()),
            "matmul_gflops_by_library": matmul, "read_gbps_by_library": read,
            "matmul_n": matmul_n, "read_bytes": read_bytes, "other_load": [load.value]}


PROBE_MATMUL_N = 2048
PROBE_READ_BYTES = 256 * 2 ** 20


def probe(repeats: int = 3, matmul_n: int = PROBE_MATMUL_N,
          read_bytes: int = PROBE_READ_BYTES) -> dict:
    """The machine's speed right now, taken between two paired timed runs: PyTorch's
    square matmul GFLOP/s and read bandwidth, medians of ``repeats``. On a shared VM
    both drift by up to 2x within a minute (bench/NOTES.md), so a fraction of the
    ceiling divides each run by the probes around it, scaled by how much faster than
    PyTorch the best library was in the ceilings worker (:func:`scaled`). PyTorch only:
    NumPy's OpenBLAS threads keep spinning after a call and halved the read figure."""
    import torch

    a = torch.from_numpy(np.random.default_rng(0).standard_normal((matmul_n, matmul_n),
                                                                  dtype=np.float32))
    x = torch.ones(read_bytes // 4)
    return {"matmul_gflops": 2.0 * matmul_n ** 3 / median_seconds(lambda: a @ a, repeats) / 1e9,
            "read_gbps": read_bytes / median_seconds(lambda: x.sum(), repeats) / 1e9}


def scaled(probe_result: dict, ceilings: dict) -> dict:
    """A probe (PyTorch) lifted to the best library: x (best / PyTorch) of the ceilings."""
    out = {}
    for key in ("matmul_gflops", "read_gbps"):
        torch_best = ceilings.get(f"{key}_by_library", {}).get("torch")
        out[key] = probe_result[key] * (ceilings[key] / torch_best if torch_best else 1.0)
    return out


def combine(first: dict, last: dict) -> dict:
    """Ceilings measured before and after the run: the best of each figure, so a
    moment of contention on a shared machine does not lower the ceiling."""
    out = dict(first)
    for key in ("matmul_gflops_by_library", "read_gbps_by_library"):
        out[key] = {lib: max(v, last[key][lib]) for lib, v in first[key].items()}
    out["matmul_gflops"] = max(out["matmul_gflops_by_library"].values())
    out["read_gbps"] = max(out["read_gbps_by_library"].values())
    out["other_load"] = first["other_load"] + last["other_load"]
    return out
