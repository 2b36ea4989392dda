"""``meditron-jax bench`` / ``python -m bench``: ours against transformers, one run.

The parent process only orchestrates: every measurement runs in a worker process
(``bench/worker.py``) pinned to the same CPUs and thread count: first the machine's
ceilings, then per preset the transformers side (which writes the shared random
weights) and our side (which loads them), both alive at once so that their timed runs
alternate, with probes of the machine's speed between the pairs (``bench/paired.py``).
Results go to the console table and, with ``--json``, to a file written aside and
renamed.

``--benches ...,sweep`` adds the generation-sweep row (``bench/sweep.py``, one process per
preset and length distribution: continuous batching, the static engine and transformers'
``generate`` on the same prompts, in one run). It is opt-in: 256 prompts of up to 256
new tokens take about half an hour per distribution on ``small`` on a 2-core box.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import beyond_cpu, ceilings, machine, report, sweep
from bench.paired import (NEVER_PAIRED, Served, WorkerFailed, pair_fits, run_alone,
                          run_paired)
from bench.presets import (ALL_BENCHMARKS, BENCHMARKS, PRESETS, base_bench, is_int8, parse_list,
                           peak_gib_estimate)
from bench.timing import MAX_OTHER_LOAD
from meditron_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="small,medium",
                        help=f"comma-separated model sizes: {', '.join(PRESETS)}")
    parser.add_argument("--benches", default=",".join(BENCHMARKS),
                        help="comma-separated benchmarks to run; also "
                             f"{', '.join(b for b in ALL_BENCHMARKS if b not in BENCHMARKS)} "
                             f"(our side only: int8 weights) and {SWEEP} (a generation "
                             "sweep with varied completion lengths: continuous batching "
                             "against the static engine and transformers)")
    parser.add_argument("--sweep-prompts", type=int, default=256,
                        help=f"{SWEEP}: prompts in the sweep")
    parser.add_argument("--sweep-batch", type=int, default=8,
                        help=f"{SWEEP}: slots (continuous) and batch size (static, transformers)")
    parser.add_argument("--sweep-new", default="8,256", metavar="MIN,MAX",
                        help=f"{SWEEP}: fewest and most new tokens of a row")
    parser.add_argument("--sweep-lengths", default=",".join(sweep.LENGTHS),
                        help=f"{SWEEP}: how the rows' counts are drawn, comma-separated "
                             f"({', '.join(sweep.LENGTHS)}): one sweep each")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed pairs per benchmark (one run of each side back to "
                             "back; medians are reported, warm-up runs are extra)")
    parser.add_argument("--remeasure", type=int, default=5,
                        help="extra timed pairs per benchmark, at most, to replace pairs "
                             "during which other processes used more than "
                             f"{MAX_OTHER_LOAD:.0%}% of the pinned CPUs; a benchmark still "
                             "left with such a pair is reported unreliable, never as met")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads for both sides (each worker is pinned to this many CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared random weights")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the results as JSON to PATH")
    parser.add_argument("--workdir", default=None,
                        help="where the shared weights are written (default: a temporary "
                             "directory, removed afterwards)")
    parser.add_argument("--ceiling-matmul-n", type=int, default=ceilings.MATMUL_N,
                        help="side of the square float32 matmuls that measure the FLOP/s ceiling")
    parser.add_argument("--ceiling-read-mib", type=int, default=ceilings.READ_BYTES // 2 ** 20,
                        help="MiB summed to measure the read-bandwidth ceiling (keep it well "
                             "above the last-level cache)")
    parser.add_argument("--worker-timeout", type=float, default=4 * 3600.0,
                        help="seconds a worker may take for one step (start-up, a warm-up, "
                             "one timed run, or a whole ceilings/plan run) before it is "
                             "killed (its preset is then reported as failed; the others "
                             "are kept)")
    parser.add_argument("--no-plan", action="store_true",
                        help="skip the ahead-of-time meditron3-8b plan section")


SWEEP = "sweep"


def _check(args) -> tuple[list[str], list[str]]:
    presets = parse_list(args.presets, PRESETS, "presets")
    benches = parse_list(args.benches, ALL_BENCHMARKS + (SWEEP,), "benches")
    if SWEEP in benches:
        lengths = parse_list(args.sweep_lengths, sweep.LENGTHS, "sweep-lengths")
        try:
            low, high = (int(x) for x in args.sweep_new.split(","))
        except ValueError:
            raise UserError(f"--sweep-new: give MIN,MAX (two integers), got "
                            f"{args.sweep_new!r}") from None
        if not 1 <= low <= high:
            raise UserError(f"--sweep-new: need 1 <= {low} <= {high}")
        if not 1 <= args.sweep_batch <= args.sweep_prompts:
            raise UserError(f"--sweep-prompts {args.sweep_prompts} must be >= --sweep-batch "
                            f"{args.sweep_batch} >= 1")
        args.sweep_plan = (lengths, low, high)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.remeasure < 0:
        raise UserError(f"--remeasure must be >= 0, got {args.remeasure}")
    available = len(os.sched_getaffinity(0))
    if not 1 <= args.threads <= available:
        raise UserError(f"--threads must be between 1 and {available} (the CPUs this "
                        f"process may use), got {args.threads}")
    if args.ceiling_matmul_n < 64 or args.ceiling_read_mib < 1:
        raise UserError("--ceiling-matmul-n must be >= 64 and --ceiling-read-mib >= 1")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"--json {args.json}: its directory does not exist")
    return presets, benches


def _worker(kind: str, out_dir: str, args, timeout: float, **opts) -> dict:
    """A one-shot worker (ceilings, plan): run it, read its ``--out`` file."""
    out = os.path.join(out_dir, f"{kind}-{opts.get('preset', 'machine')}.json")
    cmd = [sys.executable, "-m", "bench.worker", kind, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--out", out]
    for key, value in opts.items():
        cmd += [f"--{key}", str(value)]
    print(f"bench: {kind}", file=sys.stderr, flush=True)
    return _run_for_json(f"the {kind} worker", cmd, out, timeout)


def _run_for_json(what: str, cmd: list[str], out: str, timeout: float) -> dict:
    """Run ``cmd``, which writes ``out``, and read it; WorkerFailed (its last output
    printed) on a timeout, a failure or no file. A previous run's file is removed first."""
    if os.path.exists(out):
        os.remove(out)  # never read a previous run's result
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"{what} ran past --worker-timeout={timeout:g}s; "
                           "try fewer --repeats or a smaller preset") from None
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        raise WorkerFailed(f"{what} failed (exit {proc.returncode}); its last "
                           "output is printed above")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def measure_preset(name: str, benches: list[str], args, workdir: str, probe: Served) -> dict:
    """bench -> (ours, theirs, our probes, their probes, paired) for one preset; a bench
    that could not run maps to {"missing": why} on both sides."""
    p = PRESETS[name]
    runnable, skipped = _fitting(p, benches)
    out: dict = {b: (m, m, None, None, False) for b, m in skipped.items()}
    if not runnable:
        return out
    weights = os.path.join(workdir, f"weights-{name}")
    timeout = args.worker_timeout

    def start(kind: str) -> Served:
        return Served(kind, args, workdir, timeout, preset=name, weights=weights)
    free = machine.available_gib()
    int8 = [b for b in runnable if is_int8(b)]  # our side only, after the others
    paired = [b for b in runnable
              if b not in int8 and b not in NEVER_PAIRED and pair_fits(p, b, free)]
    alone = [b for b in runnable if b not in paired and b not in int8]
    rss = {"ours": None, "transformers": None}
    try:
        if paired:
            theirs = start("transformers")  # builds the shared weights, then ours loads them
            try:
                ours = start("ours")
                try:
                    for bench in paired:
                        o, t, po, pt = run_paired(bench, args.repeats, args.remeasure,
                                                  theirs, ours, probe)
                        out[bench] = (o, t, po, pt, True)
                    rss["ours"] = ours.close().get("peak_rss_gb")
                finally:
                    ours.kill()
                rss["transformers"] = theirs.close().get("peak_rss_gb")
            finally:
                theirs.kill()
        for bench in alone:
            t, pt = run_alone(bench, args.repeats, args.remeasure,
                              lambda: start("transformers"), probe)
            o, po = run_alone(bench, args.repeats, args.remeasure, lambda: start("ours"), probe)
            out[bench] = (o, t, po, pt, False)
            rss = {"ours": max(rss["ours"] or 0, o.get("peak_rss_gb") or 0),
                   "transformers": max(rss["transformers"] or 0, t.get("peak_rss_gb") or 0)}
        if int8 and not os.path.exists(os.path.join(weights, "config.json")):
            start("transformers").close()  # writes the shared weights ours loads
        for bench in int8:
            o, po = run_alone(bench, args.repeats, args.remeasure, lambda: start("ours"), probe)
            out[bench] = (o, None, po, None, False)
            rss["ours"] = max(rss["ours"] or 0, o.get("peak_rss_gb") or 0)
    except WorkerFailed as exc:  # what was measured before the failure is kept
        print(f"bench: {name}: {exc}", file=sys.stderr)
        out.update({b: ({"missing": str(exc)},) * 2 + (None, None, False)
                    for b in runnable if b not in out})
    out["_rss"] = rss
    return out


def _sweeps(name: str, args, workdir: str) -> dict:
    """``sweep-<lengths>`` -> bench/sweep.py's result for preset ``name``, one process
    each (its own memory, the pinned CPUs); a failure is reported, not raised."""
    lengths, low, high = args.sweep_plan
    out = {}
    for dist in lengths:
        path = os.path.join(workdir, f"sweep-{name}-{dist}.json")
        cmd = [sys.executable, "-m", "bench.sweep", "--preset", name, "--lengths", dist,
               "--prompts", str(args.sweep_prompts), "--batch", str(args.sweep_batch),
               "--min-new", str(low), "--max-new", str(high), "--threads", str(args.threads),
               "--seed", str(args.seed), "--json", path]
        print(f"bench: {name} {SWEEP} ({dist} lengths)", file=sys.stderr, flush=True)
        try:
            raw = _run_for_json(f"the {name} {SWEEP} ({dist})", cmd, path, args.worker_timeout)
        except WorkerFailed as exc:
            print(f"bench: {exc}", file=sys.stderr)
            out[f"{SWEEP}-{dist}"] = {"missing": str(exc)}
            continue
        out[f"{SWEEP}-{dist}"] = report.sweep_entry(raw)
    return out


def measure(args, presets: list[str], benches: list[str], workdir: str) -> dict:
    started = time.time()
    do_sweep = SWEEP in benches
    benches = [b for b in benches if b != SWEEP]
    result: dict = {"machine": machine.describe(args.threads)}
    sizes = {"matmul-n": args.ceiling_matmul_n, "read-mib": args.ceiling_read_mib}
    limits = _worker("ceilings", workdir, args, args.worker_timeout, **sizes)
    result["machine"]["pinned_cpus"] = limits["cpus"]
    rss: dict = {}
    measured: dict = {}
    probe = Served("probe", args, workdir, args.worker_timeout)
    try:
        for name in presets:
            measured[name] = measure_preset(name, benches, args, workdir, probe)
            rss[name] = measured[name].pop("_rss", None)
            if do_sweep:
                measured[name]["_sweeps"] = _sweeps(name, args, workdir)
    finally:
        probe.close()
    last = _worker("ceilings", workdir, args, args.worker_timeout, **sizes)
    result["ceilings"] = ceilings.combine(limits["results"], last["results"])
    for name, per_bench in measured.items():
        result[name] = {}
        sweeps = per_bench.pop("_sweeps", {})
        for b in benches:
            if is_int8(b):
                ours, _, probes, _, _ = per_bench[b]
                fp32 = per_bench.get(base_bench(b), (None,))[0]
                result[name][b] = report.int8_entry(PRESETS[name], b, ours, probes,
                                                    ceilings=result["ceilings"], fp32=fp32)
            else:
                result[name][b] = report.bench_entry(PRESETS[name], b, *per_bench[b],
                                                     ceilings=result["ceilings"])
        result[name].update(sweeps)
    if not args.no_plan:
        try:
            result["beyond_cpu"] = _worker("plan", workdir, args, args.worker_timeout)["results"]
        except WorkerFailed as exc:
            result["beyond_cpu"] = {"failed": str(exc)}
    result["machine"].update(machine.load_after(), peak_rss_gb=rss,
                             wall_s=round(time.time() - started, 1))
    result["settings"] = {
        "presets": presets, "benches": benches + [SWEEP] * do_sweep, "repeats": args.repeats,
        "remeasure": args.remeasure, "max_other_load": MAX_OTHER_LOAD,
        "threads": args.threads, "seed": args.seed,
        # the numerators of MFU: model FLOPs per token at the benchmark's sequence length
        "model_flops_per_token": {
            name: {"train": PRESETS[name].cfg.flops_per_token(PRESETS[name].work.seq_len, True),
                   "forward": PRESETS[name].cfg.flops_per_token(PRESETS[name].work.seq_len,
                                                                False)}
            for name in presets}}
    return result


def _fitting(p, benches: list[str]) -> tuple[list[str], dict]:
    """Benchmarks whose estimated peak memory fits what the machine has free now; the
    others are reported as skipped rather than risking the OOM killer on a shared box."""
    free = machine.available_gib()
    runnable, skipped = [], {}
    for bench in benches:
        need = peak_gib_estimate(p, bench)
        if need <= free:
            runnable.append(bench)
        else:
            skipped[bench] = {"missing": f"skipped: needs ~{need:.0f} GiB, {free:.0f} GiB free"}
            print(f"bench: {p.name} {bench} {skipped[bench]['missing']}", file=sys.stderr)
    return runnable, skipped


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def run(args) -> int:
    presets, benches = _check(args)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        result = measure(args, presets, benches, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="meditron-bench-") as workdir:
            result = measure(args, presets, benches, workdir)
    print(machine.summary(result["machine"], result["ceilings"]))
    print(report.table(result, presets))
    if "beyond_cpu" in result:
        print(beyond_cpu.summary(result["beyond_cpu"]))
    if args.json:
        _write_json(args.json, result)
        print(f"bench: wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
