"""``python -m bench.int8_decode``: our decode alone, float weights against int8 weights.

A direct micro-run for when the machine is not quiet enough for ``python -m bench`` (no
transformers side, no probes, no load accounting): one process, random std-0.02 weights
of a bench preset, the Generator (per-layer weights, as ``generate`` on one CPU device)
for each (weights, compute dtype), the preset's prompt and new tokens. Decode seconds per
step = (time of a full generation - time of a 1-token one) / (new tokens - 1), the median
of ``--repeats``; the other processes' CPU share during the run is printed from
``/proc/loadavg`` before and after, so a reader can judge the noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_decode")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="weight/compute dtypes; each also runs int8 weights computing in it")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.presets import bench_preset
    from infer.engine import Generator
    from meditron_jax.io.loading import LoadedModel
    from meditron_jax.model import init_params, unstack_layers
    from meditron_jax.model.quant import quantize_params, weight_bytes

    p = bench_preset(args.preset)
    base = init_params(p.cfg, jax.random.key(0), dtype=jnp.float32, std=0.02)
    load_before = os.getloadavg()
    rows = []
    for dtype in args.dtypes.split(","):
        params = jax.tree.map(lambda a: a.astype(dtype), base)
        for label, tree in ((dtype, params), (f"int8->{dtype}", quantize_params(params))):
            model = LoadedModel(cfg=p.cfg, params=unstack_layers(tree), tokenizer=None,
                                generation_config={}, path="", kind="native")
            for b in (int(x) for x in args.batches.split(",")):
                prompts = np.random.default_rng(2).integers(
                    3, p.cfg.vocab_size, (b, p.work.prompt_len)).tolist()
                gen = Generator(model, None, batch_size=b)

                def run(n):
                    t0 = time.perf_counter()
                    out = gen.generate(prompts, max_new_tokens=n, stop_ids=())
                    assert all(len(c.ids) == n for c in out)
                    return time.perf_counter() - t0, out
                run(1), run(p.work.new_tokens)  # compile both
                steps = []
                for _ in range(args.repeats):
                    one, _ = run(1)
                    full, out = run(p.work.new_tokens)
                    steps.append((full - one) / (p.work.new_tokens - 1))
                s = statistics.median(steps)
                row = {"weights": label, "batch": b, "decode_s_per_step": s,
                       "tokens_per_s": b / s, "params_bytes": weight_bytes(tree),
                       "tokens": [c.ids for c in out]}
                rows.append(row)
                print(f"{args.preset} {label:16s} b{b}: {b / s:8.1f} tok/s "
                      f"({s * 1e3:.1f} ms/step), weights {row['params_bytes'] / 2 ** 20:.0f} MiB",
                      flush=True)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"preset": args.preset, "rows": rows, "loadavg": [load_before, load_after]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
