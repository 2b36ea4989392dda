"""Measurements in fresh processes: ``python -m bench.worker KIND ...``.

Each side runs in its own process so neither inherits the other's thread pools, its
spinning OpenMP workers or its allocator state. The process pins its CPU set and
thread counts *before* JAX or PyTorch start, identically for both sides. ``ceilings``
and ``plan`` write ``--out`` and exit; ``transformers`` and ``ours`` load their model
once and then serve the parent's commands (:func:`serve`), so the parent can alternate
the two sides' timed runs and probe the machine between them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from bench.timing import OtherLoad

SERVED = ("transformers", "ours", "probe")  # long-lived: driven over stdin/stdout
KINDS = ("ceilings", "plan") + SERVED       # ceilings, plan: write --out and exit
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


def serve(side, commands, replies) -> None:
    """Answer the parent's commands, one JSON object per line each way: ``warm``,
    ``once`` and ``finish`` (with ``bench``) drive one benchmark, ``probe`` measures the
    machine's speed now, ``exit`` ends; ``once`` and ``probe`` also report the share of
    the pinned CPUs other processes used meanwhile (``other_load``). A failure is
    answered with ``error`` and the worker goes on (the parent decides)."""
    current: dict = {}
    for line in commands:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "exit":
            break
        try:
            if op in ("once", "probe"):
                from bench import ceilings
                with OtherLoad() as load:
                    reply = ceilings.probe() if op == "probe" else current[cmd["bench"]].once()
                reply["other_load"] = load.value
            elif op == "warm":
                current.clear()  # drop the previous benchmark's buffers first
                current[cmd["bench"]] = bench = side.bench(cmd["bench"])
                reply = bench.warm()
            elif op == "finish":
                reply = current[cmd["bench"]].finish()
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception as exc:  # noqa: BLE001 (reported to the parent, which decides)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=5, help="ceilings: repeats")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="snapshot directory shared by both sides")
    parser.add_argument("--matmul-n", type=int, default=3072)
    parser.add_argument("--read-mib", type=int, default=512)
    parser.add_argument("--out", help="result file (ceilings, plan)")
    args = parser.parse_args(argv)

    cpus = pin_threads(args.threads, devices=8 if args.kind == "plan" else 1)
    if args.kind != "ours" and args.kind != "plan":  # keep PyTorch's runtime out of ours
        _torch_threads(len(cpus))
    if args.kind in SERVED:
        # The protocol owns the original stdout; anything a library prints goes to stderr.
        replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
        os.dup2(2, 1)
        from bench.presets import bench_preset
        p = bench_preset(args.preset)
        side = None  # the probe worker only answers probes
        if args.kind == "transformers":
            from bench import hf_side
            side = hf_side.Side(p, args.weights, args.seed)
        elif args.kind == "ours":
            from bench import jax_side
            side = jax_side.Side(p, args.weights)
        replies.write(json.dumps({"ready": True, "cpus": cpus,
                                  "matmul": getattr(side, "matmul", None)}) + "\n")
        replies.flush()
        serve(side, sys.stdin, replies)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        replies.write(json.dumps({"peak_rss_gb": round(peak_kb / 2 ** 20, 2)}) + "\n")
        replies.flush()
        return 0
    if args.kind == "plan":
        from bench import beyond_cpu
        result = beyond_cpu.measure()
    else:
        from bench import ceilings
        result = ceilings.measure(args.repeats, args.matmul_n, args.read_mib * 2 ** 20)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"cpus": cpus, "peak_rss_gb": round(peak_kb / 2 ** 20, 2), "results": result}
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
