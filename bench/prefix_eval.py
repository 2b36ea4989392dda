"""Prefix reuse in ``meditron-jax eval``: wall time and tokens computed, with and without.

Five-shot evaluation of the four bundled samples (``meditron_jax/data/eval``, 12
questions each) on a random benchmark model (``--preset small``: transformers' init,
saved as a snapshot, with a byte-level BPE trained on the bundled texts), once with
``--prefix-cache off`` and once ``on``, each mode in a fresh process (so each pays its
own compilations), ``--repeats`` times alternating. Every task goes through the
``eval`` command itself; its scorer is wrapped only to read its counters (token slots
run through the model, padding and idle rows included, and real tokens). The two
modes' per-item log-likelihoods are compared at the end.

    python -m bench.prefix_eval --workdir /tmp/prefix_eval [--preset small] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TASK_FILES = {"medqa": "medqa", "medmcqa": "medmcqa", "pubmedqa": "pubmedqa",
              "mmlu": "mmlu_medical"}
SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]  # ids 0, 1, 2: the presets' bos/eos


def data_dir() -> str:
    import meditron_jax
    return os.path.join(os.path.dirname(meditron_jax.__file__), "data")


def prepare(workdir: str, preset: str, vocab: int, *, model_vocab: bool = False) -> str:
    """The random model's snapshot with a tokenizer (built once, then reused).
    ``model_vocab``: the model's vocabulary shrunk to the tokenizer's, so that every id it
    generates decodes to text (scoring does not need it)."""
    import dataclasses

    from bench.hf_side import load_or_build
    from bench.presets import bench_preset
    p = bench_preset(preset)
    name = f"model_{preset}"
    if model_vocab:
        p = dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, vocab_size=vocab))
        name += f"_vocab{vocab}"
    model_dir = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        os.makedirs(model_dir, exist_ok=True)
        load_or_build(p, 0, model_dir)
        train_tokenizer(vocab).save(os.path.join(model_dir, "tokenizer.json"))
    return model_dir


def train_tokenizer(vocab: int):
    """A byte-level BPE learned from the bundled texts (every byte stays encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([os.path.join(data_dir(), "eval", f"{name}_sample.jsonl")
               for name in TASK_FILES.values()] + [os.path.join(data_dir(), "clinical_corpus.txt")],
              trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    return tok


def child(args) -> dict:
    """One mode, every task, in this process: the ``eval`` command per task."""
    import infer.eval_cli as eval_cli
    from cli import main as cli
    scorers, timings = [], []

    class Recorded(eval_cli.GroupedScorer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            scorers.append(self)

    evaluate = eval_cli.evaluate

    def timed_evaluate(*a, **kw):
        start = time.perf_counter()
        out = evaluate(*a, **kw)
        timings.append(time.perf_counter() - start)
        return out

    eval_cli.GroupedScorer, eval_cli.evaluate = Recorded, timed_evaluate
    tasks = {}
    for task, name in TASK_FILES.items():
        out = os.path.join(args.out, task)
        argv = ["eval", "--model", args.model, "--task", task, "--shots", str(args.shots),
                "--data", os.path.join(data_dir(), "eval", f"{name}_sample.jsonl"),
                "--batch-size", str(args.batch_size), "--prefix-cache", args.child,
                "--out", out]
        start = time.perf_counter()
        if cli.main(argv) != 0:
            raise SystemExit(f"eval {task} failed")
        wall = time.perf_counter() - start
        with open(os.path.join(out, os.path.basename(args.model), task, "items.jsonl"),
                  encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        tasks[task] = {"command_s": wall, "evaluate_s": timings[-1],
                       **scorers[-1].computed,
                       "loglikelihoods": [r["loglikelihoods"] for r in records],
                       "pred": [r["pred"] for r in records],
                       "pred_norm": [r["pred_norm"] for r in records]}
    return tasks


def compare(off: dict, on: dict) -> dict:
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for t in off for a, b in zip(off[t]["loglikelihoods"], on[t]["loglikelihoods"]))
    same = all(off[t][k] == on[t][k] for t in off for k in ("pred", "pred_norm"))
    return {"max_abs_loglikelihood_diff": diff, "same_predictions": same}


def totals(run: dict) -> dict:
    keys = ("command_s", "evaluate_s", "slots", "tokens", "prefix_batches", "plain_batches")
    return {k: sum(run[t][k] for t in run) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="model snapshot (made once), eval outputs and prefix_eval.json")
    p.add_argument("--preset", default="small", help="benchmark model (bench/presets.py)")
    p.add_argument("--repeats", type=int, default=2, metavar="N", help="off/on pairs")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary to train")
    p.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    model = prepare(args.workdir, args.preset, args.vocab)
    runs = []
    for rep in range(args.repeats):
        pair = {}
        for mode in ("off", "on"):
            out = os.path.join(args.workdir, f"run{rep}_{mode}")
            cmd = [sys.executable, "-m", "bench.prefix_eval", "--workdir", args.workdir,
                   "--child", mode, "--model", model, "--out", out, "--shots", str(args.shots),
                   "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            pair[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            t = totals(pair[mode])
            print(f"repeat {rep} {mode:>3}: evaluate {t['evaluate_s']:.1f} s (command "
                  f"{t['command_s']:.1f} s), {t['slots']} token slots, {t['tokens']} tokens, "
                  f"batches {t['prefix_batches']} prefix + {t['plain_batches']} whole",
                  flush=True)
        runs.append({"off": pair["off"], "on": pair["on"], **compare(pair["off"], pair["on"])})
        print(f"repeat {rep}: max |dLL| {runs[-1]['max_abs_loglikelihood_diff']:.2e}, "
              f"same predictions {runs[-1]['same_predictions']}", flush=True)
    with open(os.path.join(args.workdir, "prefix_eval.json"), "w", encoding="utf-8") as f:
        json.dump({"preset": args.preset, "shots": args.shots, "batch_size": args.batch_size,
                   "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
