"""Turn raw timings into the benchmark's JSON and console table.

Per benchmark: tokens/s on each side, their ratio, and the fraction of the machine's
ceiling: MFU (model FLOPs/s over the matmul ceiling) for forward and training, and
for decode the bytes a step must read (weights + KV cache) per second over the read
bandwidth, i.e. the fraction of the weight-streaming bound.

Two rules keep noise out of the verdicts. A row during which other processes used more
than ``MAX_OTHER_LOAD`` of the pinned CPUs (in a kept timed run or a probe around one;
bench/paired.py measures such runs again first) is "unreliable", never "met". And no
fraction exceeds 100%: the ceiling a run is divided by is at least the best rate any
run showed in the same window (both sides of a pair ran between the same probes); a
run that beat its measured ceiling shows that ceiling was wrong, so the row's fraction
is then only an upper bound and its fraction target "unreliable".
"""
from __future__ import annotations

import statistics

from bench.ceilings import scaled
from bench.presets import (BenchPreset, base_bench, decode_bytes_per_step, decode_weight_bytes,
                           is_int8, tokens_per_step)
from bench.timing import MAX_OTHER_LOAD

# bench -> (min ratio to transformers, min fraction of ceiling or None)
TARGETS = {"forward": (1.0, 0.8), "decode_b1": (1.5, 0.8), "decode_b8": (2.0, None),
           "train": (1.3, 0.6)}


def rate(p: BenchPreset, bench: str, seconds: float) -> float:
    """Model FLOP/s (forward, train) or bytes read per second (decode) of one run."""
    if bench in ("forward", "train"):
        flops = p.cfg.flops_per_token(p.work.seq_len, training=bench == "train")
        return flops * tokens_per_step(p, bench) / seconds
    return decode_bytes_per_step(p, bench) / seconds


def _ceiling(bench: str, ceilings: dict) -> float:
    if bench in ("forward", "train"):
        return ceilings["matmul_gflops"] * 1e9
    return ceilings["read_gbps"] * 1e9


def _fraction(bench: str, rates: list[float], observed: list[float], probes,
              ceilings: dict) -> tuple[float, int]:
    """Median over the timed runs of each run's rate over the machine's speed measured
    around it (bench/paired.py, lifted to the best library; without probes, the run's
    best ceilings), that ceiling raised to the best rate ``observed`` in the same window;
    and how many runs' ceilings had to be raised."""
    if probes and len(probes) == len(rates):
        window = [_ceiling(bench, scaled(c, ceilings)) for c in probes]
    else:
        window = [_ceiling(bench, ceilings)] * len(rates)
    return (statistics.median(r / max(c, o) for r, c, o in zip(rates, window, observed)),
            sum(o > c for c, o in zip(window, observed)))


def _loads(side: dict, probes) -> list[float]:
    """Other processes' share of the pinned CPUs in each timed run or the probes around it."""
    runs = side["other_load_runs"]
    around = [c["other_load"] for c in probes] if probes else [0.0] * len(runs)
    return [max(a, b) for a, b in zip(runs, around)]


def bench_entry(p: BenchPreset, bench: str, ours: dict, theirs: dict, our_probes=None,
                their_probes=None, paired: bool = False, *, ceilings: dict) -> dict:
    """The JSON entry for one (preset, benchmark) pair."""
    if "seconds" not in ours or "seconds" not in theirs:
        return {"missing": ours.get("missing") or theirs.get("missing") or "not measured"}
    n = tokens_per_step(p, bench)
    pairs = [t / o for t, o in zip(theirs["seconds_all"], ours["seconds_all"])] if paired else []
    rates = [[rate(p, bench, s) for s in side["seconds_all"]] for side in (ours, theirs)]
    # a pair's two runs share one window (the same probes); an unpaired run has its own
    observed = [[max(a, b) for a, b in zip(*rates)]] * 2 if pairs else rates
    ours_fraction, raised = _fraction(bench, rates[0], observed[0], our_probes, ceilings)
    theirs_fraction, _ = _fraction(bench, rates[1], observed[1], their_probes, ceilings)
    loads = {"ours": _loads(ours, our_probes), "transformers": _loads(theirs, their_probes)}
    entry = {
        "ours_tokens_per_s": n / ours["seconds"],
        "transformers_tokens_per_s": n / theirs["seconds"],
        # paired runs: the median of the per-pair ratios (each pair ran back to back)
        "ratio": statistics.median(pairs) if pairs else theirs["seconds"] / ours["seconds"],
        "fraction_of_ceiling": ours_fraction,
        "compiles_after_warmup": ours["compiles_after_warmup"],
        "ceiling_kind": "mfu" if bench in ("forward", "train") else "read_bandwidth",
        "transformers_fraction_of_ceiling": theirs_fraction,
        # against the best ceilings of the whole run (before/after workers), not the
        # probes, raised likewise to the best rate of the row
        "fraction_of_run_ceiling": rate(p, bench, ours["seconds"]) / max(
            _ceiling(bench, ceilings), *rates[0], *rates[1]),
        # our runs faster than the ceiling measured around them (raised to that rate)
        "ceiling_raised_runs": raised,
        "paired": bool(pairs),
        "pair_ratios": pairs,
        # CPU share other processes took during each kept run or the probes around it
        # (0 = a clean measurement), the largest of them, and the runs measured again
        "other_load_runs": loads,
        "other_load": max(loads["ours"] + loads["transformers"]),
        "remeasured": {"ours": ours["remeasured"], "transformers": theirs["remeasured"]},
        "ours_compile_s": ours.get("compile_s"),
        "ours_first_call_s": ours.get("first_call_s"),
        "transformers_first_call_s": theirs.get("first_call_s"),
        "ours_matmul": ours.get("matmul"),  # "xla": XLA's own dot
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
    if bench.startswith("decode"):
        entry["weight_bytes_per_step"] = decode_weight_bytes(p, bench)
    entry["verdict"], why = verdict(bench, entry)
    if why:
        entry["unreliable_because"] = why
    entry["meets_target"] = entry["verdict"] == "met"
    return entry


def int8_entry(p: BenchPreset, bench: str, ours: dict, probes=None, *, ceilings: dict,
               fp32: dict | None = None) -> dict:
    """The JSON entry of an int8 decode benchmark: our side only (transformers has no int8
    weights here), against our own float32 run of the same decode benchmark when it was
    measured (``fp32``: its raw result, another worker, not paired), with the weight bytes
    each step streams. There is no target: the row reports what XLA:CPU does with int8."""
    if "seconds" not in ours:
        return {"missing": ours.get("missing") or "not measured"}
    n = tokens_per_step(p, bench)
    rates = [rate(p, bench, s) for s in ours["seconds_all"]]
    fraction, raised = _fraction(bench, rates, rates, probes, ceilings)
    loads = _loads(ours, probes)
    entry = {
        "ours_tokens_per_s": n / ours["seconds"],
        "transformers_tokens_per_s": None,  # no int8 on their side
        "fraction_of_ceiling": fraction,    # bytes read (int8 weights) per second / read BW
        "ceiling_kind": "read_bandwidth",
        "ceiling_raised_runs": raised,
        "compiles_after_warmup": ours["compiles_after_warmup"],
        "weight_bytes_per_step": decode_weight_bytes(p, bench),
        "fp32_weight_bytes_per_step": decode_weight_bytes(p, base_bench(bench)),
        "ours_params_bytes": ours.get("params_bytes"),
        "paired": False,
        "other_load_runs": {"ours": loads},
        "other_load": max(loads),
        "remeasured": {"ours": ours["remeasured"]},
        "ours_compile_s": ours.get("compile_s"),
        "ours_first_call_s": ours.get("first_call_s"),
        "ours_ttft_s": ours.get("ttft_s"),
        "ours_total_s": ours.get("total_s"),
        "ours_matmul": ours.get("matmul"),
    }
    if fp32 and "seconds" in fp32:
        entry["fp32_tokens_per_s"] = n / fp32["seconds"]
        entry["ratio_vs_fp32"] = fp32["seconds"] / ours["seconds"]  # > 1: int8 faster
        entry["fp32_params_bytes"] = fp32.get("params_bytes")
        if "tokens" in fp32 and "tokens" in ours:
            pairs = [(a, b) for ra, rb in zip(ours["tokens"], fp32["tokens"])
                     for a, b in zip(ra, rb)]
            entry["greedy_tokens_agree_vs_fp32"] = sum(a == b for a, b in pairs) / max(
                len(pairs), 1)
    if entry["compiles_after_warmup"]:
        entry["verdict"] = "recompiled"
    elif entry["other_load"] > MAX_OTHER_LOAD:
        entry["verdict"] = "unreliable"
        entry["unreliable_because"] = (f"other processes used {entry['other_load']:.0%} of "
                                       f"the pinned CPUs (limit {MAX_OTHER_LOAD:.0%})")
    else:
        entry["verdict"] = "no target"
    entry["meets_target"] = None
    return entry


def verdict(bench: str, entry: dict) -> tuple[str, str | None]:
    """"met", "not met" or "unreliable" (with why): a timing taken under other
    processes' load, or a fraction that is only an upper bound, is never "met"."""
    ratio, fraction = TARGETS[bench]
    if entry["compiles_after_warmup"]:  # a count, not a timing: no noise in it
        return "not met", None
    if entry["other_load"] > MAX_OTHER_LOAD:
        return "unreliable", (f"other processes used {entry['other_load']:.0%} of the "
                              f"pinned CPUs (limit {MAX_OTHER_LOAD:.0%})")
    if entry["ratio"] < ratio:
        return "not met", None
    if fraction is not None and entry["ceiling_raised_runs"]:
        return "unreliable", "a run beat the ceiling measured around it"
    if fraction is not None and entry["fraction_of_ceiling"] < fraction:
        return "not met", None
    return "met", None


def _target_text(bench: str) -> tuple[str, str]:
    ratio, fraction = TARGETS[bench]
    return f">={ratio:g}x", ("-" if fraction is None else f">={fraction:.0%}")


def _verdict_text(entry: dict) -> str:
    return ({"met": "yes", "not met": "NO"}.get(entry["verdict"])
            or f"unreliable: {entry['unreliable_because']}")


def _int8_row(name: str, bench: str, e: dict) -> str:
    """An int8 row in the same columns: the ratio column holds ours int8 over our fp32."""
    vs = (f"{e['ratio_vs_fp32']:.2f}x vs our fp32" if "ratio_vs_fp32" in e
          else "fp32 not measured")
    ttft = f"{e['ours_ttft_s'] * 1e3:.0f} / - ms" if e.get("ours_ttft_s") is not None else "-"
    why = f": {e['unreliable_because']}" if "unreliable_because" in e else ""
    return (f"| {name} | {bench} | {e['ours_tokens_per_s']:.1f} | - (no int8) | {vs} "
            f"| {e['fraction_of_ceiling']:.0%} of read BW at "
            f"{e['weight_bytes_per_step'] / 2 ** 20:.1f} MiB/step "
            f"(fp32 {e['fp32_weight_bytes_per_step'] / 2 ** 20:.1f}) | - | {ttft} "
            f"| {e['ours_compile_s']:.1f} | {e['compiles_after_warmup']} "
            f"| {e['other_load']:.0%} | {e['verdict']}{why} |")


SWEEP_TARGET = 2.0   # continuous batching against the static engine


def sweep_entry(raw: dict) -> dict:
    """bench/sweep.py's result, with the verdict: met when continuous batching ran at
    >= 2x the static engine's tokens/s and its greedy tokens equal the static engine's."""
    entry = dict(raw)
    ratio = raw.get("continuous_vs_static")
    if ratio is None:
        entry["verdict"] = "incomplete"
    elif not raw.get("continuous_equals_static", False):
        entry["verdict"] = "outputs differ"
    else:
        entry["verdict"] = "met" if ratio >= SWEEP_TARGET else "not met"
    entry["meets_target"] = entry["verdict"] == "met"
    return entry


def _sweep_row(name: str, bench: str, e: dict) -> str:
    def tps(side):
        return f"{e[side]['tokens_per_s']:.1f}" if side in e else "-"
    vs_hf = (f"; {e['continuous_vs_transformers']:.2f}x transformers"
             if "continuous_vs_transformers" in e else "")
    vs_static = (f"{e['continuous_vs_static']:.2f}x static ({SWEEP_TARGET:g}x){vs_hf}"
                 if "continuous_vs_static" in e else "-")
    bound = f"batching's bound {e['bound']:.2f}x" + (
        f"; decode alone {e['decode_vs_static']:.2f}x" if "decode_vs_static" in e else "")
    load = e.get("loadavg") or [[float("nan")], [float("nan")]]
    compiles = e.get("continuous", {}).get("compiles_after_warmup", "-")
    return (f"| {name} | {bench} ({e['prompts']} prompts, batch {e['batch']}) | {tps('continuous')} "
            f"| {tps('transformers')} | {vs_static} | {bound} | - | - "
            f"| - | {compiles} | load avg {load[0][0]:.1f} -> {load[1][0]:.1f} "
            f"| {e['verdict']} |")


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
            if is_int8(bench):
                lines.append(_int8_row(name, bench, e))
                continue
            if bench.startswith("sweep-"):
                lines.append(_sweep_row(name, bench, e))
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
                f"| {e['other_load']:.0%} | {_verdict_text(e)} |")
    return "\n".join(lines)
