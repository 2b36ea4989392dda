"""Turn raw timings into the benchmark's JSON and console table.

Per benchmark: tokens/s on each side, their ratio, and the fraction of the machine's
ceiling: MFU (model FLOPs/s over the matmul ceiling) for forward and training, and
for decode the bytes a step must read (weights + KV cache) per second over the read
bandwidth, i.e. the fraction of the weight-streaming bound.
"""
from __future__ import annotations

import statistics

from bench.ceilings import scaled
from bench.presets import BenchPreset, decode_bytes_per_step, tokens_per_step

# bench -> (min ratio to transformers, min fraction of ceiling or None)
TARGETS = {"forward": (1.0, 0.8), "decode_b1": (1.5, 0.8), "decode_b8": (2.0, None),
           "train": (1.3, 0.6)}


def _rate(p: BenchPreset, bench: str, seconds: float) -> float:
    """Model FLOP/s (forward, train) or bytes read per second (decode) of one run."""
    if bench in ("forward", "train"):
        flops = p.cfg.flops_per_token(p.work.seq_len, training=bench == "train")
        return flops * tokens_per_step(p, bench) / seconds
    return decode_bytes_per_step(p, bench) / seconds


def _ceiling(bench: str, ceilings: dict) -> float:
    if bench in ("forward", "train"):
        return ceilings["matmul_gflops"] * 1e9
    return ceilings["read_gbps"] * 1e9


def fraction_of_ceiling(p: BenchPreset, bench: str, seconds: float, ceilings: dict) -> float:
    return _rate(p, bench, seconds) / _ceiling(bench, ceilings)


def _against_probes(p: BenchPreset, bench: str, side: dict, probes,
                    ceilings: dict) -> float | None:
    """Median over the timed runs of each run's rate over the machine's speed measured
    around it (bench/paired.py, lifted to the best library); None without probes."""
    runs = side.get("seconds_all") or []
    if not probes or len(probes) != len(runs):
        return None
    return statistics.median(fraction_of_ceiling(p, bench, s, scaled(c, ceilings))
                             for s, c in zip(runs, probes))


def bench_entry(p: BenchPreset, bench: str, ours: dict, theirs: dict, our_probes=None,
                their_probes=None, paired: bool = False, *, ceilings: dict) -> dict:
    """The JSON entry for one (preset, benchmark) pair."""
    if "seconds" not in ours or "seconds" not in theirs:
        return {"missing": ours.get("missing") or theirs.get("missing") or "not measured"}
    n = tokens_per_step(p, bench)
    pairs = [t / o for t, o in zip(theirs.get("seconds_all") or [],
                                   ours.get("seconds_all") or [])] if paired else []
    run_fraction = fraction_of_ceiling(p, bench, ours["seconds"], ceilings)
    entry = {
        "ours_tokens_per_s": n / ours["seconds"],
        "transformers_tokens_per_s": n / theirs["seconds"],
        # paired runs: the median of the per-pair ratios (each pair ran back to back)
        "ratio": statistics.median(pairs) if pairs else theirs["seconds"] / ours["seconds"],
        "fraction_of_ceiling": _against_probes(p, bench, ours, our_probes, ceilings)
        or run_fraction,
        "compiles_after_warmup": ours["compiles_after_warmup"],
        "ceiling_kind": "mfu" if bench in ("forward", "train") else "read_bandwidth",
        "transformers_fraction_of_ceiling": (
            _against_probes(p, bench, theirs, their_probes, ceilings)
            or fraction_of_ceiling(p, bench, theirs["seconds"], ceilings)),
        # against the best ceilings of the whole run (before/after workers), not the probes
        "fraction_of_run_ceiling": run_fraction,
        "paired": bool(pairs),
        "pair_ratios": pairs,
        # CPU share other processes took while each side ran (0 = a clean measurement)
        "other_load": max(ours.get("other_load") or 0.0, theirs.get("other_load") or 0.0),
        "ours_compile_s": ours.get("compile_s"),
        "ours_first_call_s": ours.get("first_call_s"),
        "transformers_first_call_s": theirs.get("first_call_s"),
        "ours_matmul": ours.get("matmul"),  # "xla", or "blas (oneMKL ...)" on one CPU device
    }
    # The ratio we would get running at 100% of the ceiling: a ratio target above it
    # cannot be met on this machine whatever our program does.
    entry["ratio_at_ceiling"] = 1.0 / max(entry["transformers_fraction_of_ceiling"], 1e-9)
    if our_probes:
        entry["probe_matmul_gflops"] = [round(c["matmul_gflops"], 1) for c in our_probes]
        entry["probe_read_gbps"] = [round(c["read_gbps"], 2) for c in our_probes]
    for key in ("ttft_s", "total_s"):
        if key in ours:
            entry[f"ours_{key}"] = ours[key]
            entry[f"transformers_{key}"] = theirs[key]
    if "tokens" in ours and "tokens" in theirs:
        pairs = [(a, b) for ra, rb in zip(ours["tokens"], theirs["tokens"]) for a, b in zip(ra, rb)]
        entry["greedy_tokens_agree"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    if "max_abs_logit_diff_vs_transformers" in ours:
        entry["max_abs_logit_diff"] = ours["max_abs_logit_diff_vs_transformers"]
    entry["meets_target"] = meets_target(bench, entry)
    return entry


def meets_target(bench: str, entry: dict) -> bool:
    ratio, fraction = TARGETS[bench]
    return (entry["ratio"] >= ratio and entry["compiles_after_warmup"] == 0
            and (fraction is None or entry["fraction_of_ceiling"] >= fraction))


def _target_text(bench: str) -> tuple[str, str]:
    ratio, fraction = TARGETS[bench]
    return f">={ratio:g}x", ("-" if fraction is None else f">={fraction:.0%}")


def table(report: dict, presets: list[str]) -> str:
    """A fixed-width console/Markdown table of every measured pair."""
    head = ("| preset | benchmark | ours tok/s | transformers tok/s | ratio (target) "
            "| fraction of ceiling (target) | ratio at 100% of ceiling | TTFT ours / theirs "
            "| compile s | recompiles | other load | target met |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in presets:
        for bench, e in report.get(name, {}).items():
            if "missing" in e:
                lines.append(f"| {name} | {bench} | - | - | - | - | - | - | - | - | - "
                             f"| missing: {e['missing']} |")
                continue
            ratio_t, frac_t = _target_text(bench)
            kind = "MFU" if e["ceiling_kind"] == "mfu" else "of read BW"
            ttft = (f"{e['ours_ttft_s'] * 1e3:.0f} / {e['transformers_ttft_s'] * 1e3:.0f} ms"
                    if "ours_ttft_s" in e else "-")
            lines.append(
                f"| {name} | {bench} | {e['ours_tokens_per_s']:.1f} "
                f"| {e['transformers_tokens_per_s']:.1f} | {e['ratio']:.2f}x ({ratio_t}) "
                f"| {e['fraction_of_ceiling']:.0%} {kind} ({frac_t}) "
                f"| {e['ratio_at_ceiling']:.2f}x | {ttft} "
                f"| {e['ours_compile_s']:.1f} | {e['compiles_after_warmup']} "
                f"| {e['other_load']:.0%} | {'yes' if e['meets_target'] else 'NO'} |")
    return "\n".join(lines)
