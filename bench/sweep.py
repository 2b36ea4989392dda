"""``python -m bench.sweep``: the ``sweep`` row: a generation sweep whose completion lengths
vary, through continuous batching, the static engine, and transformers' ``generate``.

One process, the same random weights on both sides (transformers' own init of the bench
preset, float32, as bench/hf_side.py builds it), ``--prompts`` prompts of the preset's
prompt length, each with its own number of new tokens drawn from ``[--min-new,
--max-new]`` (no stop ids: every row makes exactly its tokens), by ``--lengths``:

- ``uniform``: every count equally likely (mean ~132 for 8-256);
- ``loguniform``: uniform in log space, so short completions are common and long ones
  rare (median ~51, mean ~70 for 8-256), the shape of real completion lengths (a letter
  or a sentence for most questions, an explanation for some).

A static batch runs to its longest row, so batching alone can gain at most
``bound`` = (sum over batches of batch size x longest count) / (sum of counts): 1.69x for
256 uniform prompts at batch 8, 2.54x for 256 log-uniform ones; it is reported with
the measurement.
Both engines prefill every prompt once, so their prefill time is about the same and
only the decode part can gain from batching: each engine's wall time is split into
``prefill_seconds`` and ``decode_seconds`` (its ``seconds``), and ``decode_vs_static``
compares the decode parts alone, the figure to hold against the bound.

- **continuous**: :class:`infer.batching.ContinuousEngine`, ``--batch`` slots, each
  request with its own ``max_new_tokens``; a finished row's slot takes the next prompt.
- **static**: :class:`infer.engine.Generator`, the prompts in input order in batches of
  ``--batch``, each batch generating its longest row's count (the rest of the batch
  idles behind it, as with a stop token planted earlier in those rows).
- **transformers**: ``model.generate`` over the same batches, greedy, the batch's longest
  count (``min_new_tokens`` = ``max_new_tokens``, no eos).

tokens/s = the useful tokens (the sum of every prompt's own count) / wall seconds of the
whole sweep, compilation excluded (each engine is warmed on the first batch before it is
timed; ``compiles_after_warmup`` counts what compiled in the timed sweep). Greedy tokens
are compared row for row (continuous vs static must agree exactly; vs transformers the
fraction of identical tokens is reported, float32 near-ties may differ).

``--prefix N`` adds the prefix-reuse measurement: the same sweep with an N-token shared
prefix (a system prompt) on every prompt, the continuous engine with and without reuse.
The other processes' share of the machine is printed from ``/proc/loadavg``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

LENGTHS = ("uniform", "loguniform")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", help="bench preset (bench/presets.py)")
    parser.add_argument("--prompts", type=int, default=256, help="prompts in the sweep")
    parser.add_argument("--batch", type=int, default=8,
                        help="slots (continuous) and batch size (static, transformers)")
    parser.add_argument("--min-new", type=int, default=8, help="fewest new tokens of a row")
    parser.add_argument("--max-new", type=int, default=256, help="most new tokens of a row")
    parser.add_argument("--lengths", default="uniform", choices=LENGTHS,
                        help="how the rows' new-token counts are drawn")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens (default: the preset's)")
    parser.add_argument("--sides", default="continuous,static,transformers",
                        help="which to run, comma-separated")
    parser.add_argument("--prefix", type=int, default=0, metavar="N",
                        help="also measure prefix reuse with an N-token shared prefix")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (XLA uses the process's CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from meditron_jax.errors import UserError
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in ("continuous", "static", "transformers")]
    if bad or not sides:
        raise UserError(f"--sides: unknown {', '.join(bad) or '(none)'}; choose from "
                        "continuous, static, transformers")
    if not 1 <= args.min_new <= args.max_new:
        raise UserError(f"--min-new/--max-new: need 1 <= {args.min_new} <= {args.max_new}")
    if args.prompts < args.batch or args.batch < 1:
        raise UserError(f"--prompts {args.prompts} must be >= --batch {args.batch} >= 1")
    result = run(args, sides)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


def _workload(args, cfg, prompt_len: int, prefix: int = 0):
    import numpy as np
    rng = np.random.default_rng(2)
    shared = rng.integers(3, cfg.vocab_size, prefix).tolist()
    prompts = [shared + rng.integers(3, cfg.vocab_size, prompt_len).tolist()
               for _ in range(args.prompts)]
    return prompts, new_tokens(args.lengths, args.min_new, args.max_new, args.prompts)


def new_tokens(lengths: str, low: int, high: int, n: int, seed: int = 3) -> list[int]:
    """Each row's new-token count in [low, high], drawn as ``--lengths`` says."""
    import numpy as np
    rng = np.random.default_rng(seed)
    if lengths == "uniform":
        return rng.integers(low, high + 1, n).tolist()
    drawn = np.exp(rng.uniform(np.log(low), np.log(high + 1), n))
    return np.clip(np.floor(drawn), low, high).astype(int).tolist()


def static_bound(new: list[int], batch: int) -> float:
    """Row-steps a static engine runs (each batch to its longest row) per useful token:
    the most continuous batching can gain at the same cost per row-step."""
    steps = sum(len(new[i:i + batch]) * max(new[i:i + batch]) for i in range(0, len(new), batch))
    return steps / sum(new)


def run(args, sides: list[str]) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import dataclasses
    import tempfile

    import torch

    from bench import hf_side
    from bench.presets import bench_preset
    from bench.timing import CompileCounter
    from infer.batching import ContinuousEngine, EngineRequest
    from infer.engine import Generator
    from infer.runner import bucket_length, cache_length
    from meditron_jax.io.loading import load_model
    from meditron_jax.model import unstack_layers

    torch.set_num_threads(args.threads)
    p = bench_preset(args.preset)
    prompt_len = args.prompt_len or p.work.prompt_len
    prompts, new = _workload(args, p.cfg, prompt_len)
    useful = sum(new)
    b = args.batch
    batches = [list(range(i, min(i + b, len(prompts)))) for i in range(0, len(prompts), b)]
    load_before = os.getloadavg()
    counter = CompileCounter()
    out: dict = {"preset": args.preset, "prompts": len(prompts), "batch": b,
                 "prompt_len": prompt_len, "new_tokens": [args.min_new, args.max_new],
                 "lengths": args.lengths, "useful_tokens": useful,
                 "bound": static_bound(new, b), "threads": args.threads}
    tokens: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_side.load_or_build(p, args.seed, tmp)
        model = load_model(tmp)
        model = dataclasses.replace(model, params=unstack_layers(model.params))
        max_len = prompt_len + args.max_new + args.prefix

        if "continuous" in sides:
            engine = ContinuousEngine(model, slots=b, max_len=max_len, queue_size=len(prompts))
            engine.warmup()
            counter.mark()
            reqs = [EngineRequest(q, n, stop_ids=[]) for q, n in zip(prompts, new)]
            split = engine.seconds.copy()
            t0 = time.perf_counter()
            got = engine.generate(reqs)
            seconds = time.perf_counter() - t0
            assert [len(c.ids) for c in got] == new
            tokens["continuous"] = [c.ids for c in got]
            out["continuous"] = {"seconds": seconds, "tokens_per_s": useful / seconds,
                                 **_split(engine.seconds, split),
                                 "compiles_after_warmup": counter.since_mark,
                                 "compiles_in_warmup": engine.compilations,
                                 "prefill_calls": {str(k): v for k, v in
                                                   sorted(engine.prefill_calls.items())}}
            _say("continuous", out["continuous"])

        if "static" in sides:
            gen = Generator(model, batch_size=b)
            shapes = {}   # one warm-up per cache length the batches need (each compiles)
            for batch in batches:
                n = max(new[i] for i in batch)
                shapes.setdefault(cache_length(bucket_length(prompt_len) + n), n)
            for n in shapes.values():
                gen.generate([prompts[i] for i in batches[0]], max_new_tokens=n, stop_ids=())
            counter.mark()
            rows = [None] * len(prompts)
            split = gen.seconds.copy()
            t0 = time.perf_counter()
            for batch in batches:
                done = gen.generate([prompts[i] for i in batch], stop_ids=(),
                                    max_new_tokens=max(new[i] for i in batch))
                for i, c in zip(batch, done):
                    rows[i] = c.ids[:new[i]]
            seconds = time.perf_counter() - t0
            tokens["static"] = rows
            out["static"] = {"seconds": seconds, "tokens_per_s": useful / seconds,
                             **_split(gen.seconds, split),
                             "compiles_after_warmup": counter.since_mark}
            _say("static", out["static"])

        if "transformers" in sides:
            rows = [None] * len(prompts)

            def hf_batch(batch):
                ids = torch.tensor([prompts[i] for i in batch])
                n = max(new[i] for i in batch)
                with torch.inference_mode():
                    o = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                    eos_token_id=None, pad_token_id=0)
                for r, i in enumerate(batch):
                    rows[i] = o[r, ids.shape[1]:ids.shape[1] + new[i]].tolist()
            hf_batch(batches[0][:1])                               # warm
            t0 = time.perf_counter()
            for batch in batches:
                hf_batch(batch)
            seconds = time.perf_counter() - t0
            tokens["transformers"] = rows
            out["transformers"] = {"seconds": seconds, "tokens_per_s": useful / seconds}
            _say("transformers", out["transformers"])

        if "continuous" in out and "static" in out:
            out["continuous_vs_static"] = out["static"]["seconds"] / out["continuous"]["seconds"]
            out["continuous_equals_static"] = tokens["continuous"] == tokens["static"]
            out["decode_vs_static"] = (out["static"]["decode_seconds"]
                                       / out["continuous"]["decode_seconds"])
        if "continuous" in out and "transformers" in out:
            out["continuous_vs_transformers"] = (out["transformers"]["seconds"]
                                                 / out["continuous"]["seconds"])
            same = sum(x == y for a, c in zip(tokens["continuous"], tokens["transformers"])
                       for x, y in zip(a, c))
            out["identical_tokens_vs_transformers"] = same / useful

        if args.prefix:
            out["prefix"] = _prefix_reuse(args, model, prompt_len, counter)
    out["loadavg"] = [load_before, os.getloadavg()]
    print(f"{args.lengths} lengths: bound {out['bound']:.2f}x; "
          f"ratio continuous/static {out.get('continuous_vs_static', float('nan')):.2f}x "
          f"(decode alone {out.get('decode_vs_static', float('nan')):.2f}x), "
          f"continuous/transformers {out.get('continuous_vs_transformers', float('nan')):.2f}x;"
          f" load average before {load_before[0]:.2f}, after {out['loadavg'][1][0]:.2f}",
          flush=True)
    return out


def _prefix_reuse(args, model, prompt_len: int, counter) -> dict:
    """The continuous sweep with a shared ``--prefix``-token system prompt, reuse on and
    off (the same engine and executables); identical outputs required."""
    from infer.batching import ContinuousEngine, EngineRequest

    prompts, new = _workload(args, model.cfg, prompt_len, args.prefix)
    engine = ContinuousEngine(model, slots=args.batch, queue_size=len(prompts),
                              max_len=args.prefix + prompt_len + args.max_new,
                              prefix_len=args.prefix + 16)
    engine.warmup()
    reqs = [EngineRequest(q, n, stop_ids=[]) for q, n in zip(prompts, new)]
    result, outputs = {}, {}
    for label, on in (("without", False), ("with", True)):
        engine.prefix_cache = on
        counter.mark()
        t0 = time.perf_counter()
        got = engine.generate(reqs)
        seconds = time.perf_counter() - t0
        outputs[label] = [c.ids for c in got]
        result[label] = {"seconds": seconds, "tokens_per_s": sum(new) / seconds,
                         "compiles_after_warmup": counter.since_mark}
        _say(f"prefix {args.prefix}, reuse {label}", result[label])
    result.update(prefix_tokens=args.prefix, hits=engine.prefix_hits,
                  tokens_reused=engine.prefix_tokens_reused,
                  speedup=result["without"]["seconds"] / result["with"]["seconds"],
                  identical_outputs=outputs["with"] == outputs["without"])
    return result


def _split(seconds, before) -> dict:
    """The engine's prefill / decode wall seconds since ``before`` (its ``seconds``)."""
    return {f"{k}_seconds": seconds[k] - before[k] for k in ("prefill", "decode")}


def _say(label: str, r: dict) -> None:
    split = (f": prefill {r['prefill_seconds']:.1f} s, decode {r['decode_seconds']:.1f} s"
             if "decode_seconds" in r else "")
    print(f"{label:28s} {r['tokens_per_s']:8.1f} tok/s  ({r['seconds']:.1f} s{split}"
          + (f", {r['compiles_after_warmup']} compiles after warm-up" if
             "compiles_after_warmup" in r else "") + ")", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:   # a one-line error for bad input
        from meditron_jax.errors import UserError
        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
