"""What the benchmark ran on: CPU, memory, library versions, and how busy it was.

Ratios are only comparable within one run on one machine; the load average before
and after says whether other work on the machine disturbed that run.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata

from meditron_jax import hostinfo

_LIBS = ("jax", "jaxlib", "torch", "transformers", "numpy", "mkl")


def _cpu_model() -> str:
    return hostinfo.cpuinfo_field("model name") or platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def available_gib() -> float:
    """Memory the kernel could give a new process now (MemAvailable)."""
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return float("inf")


def _version(lib: str) -> str | None:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return None


def describe(threads: int) -> dict:
    return {"cpu": _cpu_model(), "cpu_vendor": hostinfo.cpuinfo_field("vendor_id"),
            "cpu_family_model": [hostinfo.cpuinfo_field("cpu family"),
                                 hostinfo.cpuinfo_field("model")],
            # the allocator setting both sides' workers started with (hostinfo)
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "transparent_hugepages": hostinfo.thp_mode(),
            "logical_cpus": os.cpu_count(), "threads": threads,
            "memory_gb": _mem_total_gb(), "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {lib: _version(lib) for lib in _LIBS},
            "load_avg_before": [round(x, 2) for x in os.getloadavg()]}


def load_after() -> dict:
    return {"load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def summary(m: dict, ceilings: dict) -> str:
    return (f"machine: {m['cpu']}, {m['threads']} threads pinned, {m['memory_gb']} GB; "
            f"load avg before {m['load_avg_before'][0]}, after {m['load_avg_after'][0]}; "
            f"GLIBC_TUNABLES={m.get('glibc_tunables') or '(unset)'}\n"
            f"ceilings: matmul {ceilings['matmul_gflops']:.1f} GFLOP/s (float32, "
            f"{ceilings['matmul_n']}^3), read {ceilings['read_gbps']:.1f} GB/s")
