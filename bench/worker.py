"""One measurement in a fresh process: ``python -m bench.worker KIND ... --out FILE``.

Each side runs in its own process so neither inherits the other's thread pools, its
spinning OpenMP workers or its allocator state. The process pins its CPU set and
thread counts *before* JAX or PyTorch start, identically for both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

KINDS = ("ceilings", "transformers", "ours", "plan")
# XLA CPU settings for our side; bench/NOTES.md records what each one measured.
XLA_CPU_FLAGS = ""


def pin_threads(threads: int, devices: int = 1) -> list[int]:
    """Restrict this process to ``threads`` CPUs and tell every runtime to use them all.

    XLA sizes its intra-op pool from the affinity mask; PyTorch, MKL and OpenBLAS read
    the thread variables (PyTorch is also told directly once imported).
    """
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(len(cpus))
    # One CPU device to measure (the inherited test flag, 8 fake devices, would split the
    # pool); the plan compiles for 8 and runs nothing.
    os.environ["XLA_FLAGS"] = (f"{XLA_CPU_FLAGS} --xla_force_host_platform_device_count={devices}"
                               if devices > 1 else XLA_CPU_FLAGS)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cpus


def _torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--benches", default="forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="snapshot directory shared by both sides")
    parser.add_argument("--matmul-n", type=int, default=3072)
    parser.add_argument("--read-mib", type=int, default=512)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    cpus = pin_threads(args.threads, devices=8 if args.kind == "plan" else 1)
    if args.kind in ("ceilings", "transformers"):  # keep PyTorch's runtime out of ours
        _torch_threads(len(cpus))
    from bench.presets import bench_preset

    benches = args.benches.split(",")
    if args.kind == "plan":
        from bench import beyond_cpu
        result = beyond_cpu.measure()
    elif args.kind == "ceilings":
        from bench import ceilings
        result = ceilings.measure(args.repeats, args.matmul_n, args.read_mib * 2 ** 20)
    elif args.kind == "transformers":
        from bench import hf_side
        result = hf_side.run(bench_preset(args.preset), benches, args.repeats, args.seed,
                             args.weights)
    else:
        from bench import jax_side
        result = jax_side.run(bench_preset(args.preset), benches, args.repeats, args.weights)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"cpus": cpus, "peak_rss_gb": round(peak_kb / 2 ** 20, 2), "results": result}
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
