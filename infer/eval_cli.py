"""``meditron-jax eval``: few-shot medical multiple-choice evaluation of one or more models.

Every ``--model`` (a directory, or a quoted glob such as ``'ckpt/step_*'``) is scored
on the same items; the results go to ``OUT/<model>/<task>/`` and one table compares
the models, since that is how a continued-pretraining run is tracked. The table is
printed and saved as ``OUT/comparison_<task>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

from infer.cli_common import add_model_arguments, load_for_inference
from infer.eval import EvalSpec, comparison_table, evaluate, is_writer
from infer.eval_tasks import FORMATS, TASKS, check_shots, get_task, load_items
from infer.grouped_score import GroupedScorer
from meditron_jax.atomic import atomic_file, write_json
from meditron_jax.errors import UserError
from meditron_jax.io.loading import directory_kind
from meditron_jax.model.quant import check_scheme
from meditron_jax.tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, several=True)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="benchmark file in the task's public format (.jsonl, .json or .parquet)")
    p.add_argument("--shots", type=int, default=0, help="worked examples before each question")
    p.add_argument("--fewshot-data", metavar="FILE", default=None,
                   help="pool of worked examples (same format), the first --shots are used; "
                        "default: the --data file, never using an item as its own example")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate only the first N items")
    p.add_argument("--format", choices=FORMATS, default="mcq",
                   help="mcq: options listed, letters scored (lm-eval's templates); "
                        "cloze: each option's text scored")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory, when the model directory has none")
    p.add_argument("--truncate-context", action="store_true",
                   help="drop the oldest tokens of a prompt longer than the model's max "
                        "length (default: fail; lower --shots instead)")
    p.add_argument("--prefix-cache", choices=("on", "off"), default="on",
                   help="run the few-shot block the questions share once and score each "
                        "question on its KV cache (on); off: every context from scratch. "
                        "The scores are the same either way")
    p.add_argument("--chunk", type=int, default=32, metavar="N",
                   help="questions per durable write (what a kill can lose)")
    p.add_argument("--out", default="eval_results", metavar="DIR",
                   help="results directory; rerunning the command resumes from it")


def expand_models(patterns: list[str]) -> list[str]:
    """Model directories in order; a glob's matches are sorted by their numbers (step_900
    before step_1000). A directory named twice is evaluated once."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted((m for m in glob.glob(pattern) if os.path.isdir(m)), key=natural_key)
            if not matches:
                raise UserError(f"--model {pattern!r} matches no directory")
            paths += matches
        else:
            paths.append(pattern)
    unique: dict[str, str] = {}
    for p in paths:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def natural_key(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def model_labels(paths: list[str]) -> list[str]:
    """Short unique names: the last path component, or more of the path where they clash."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["_".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _check_numbers(args) -> None:
    check_scheme(args.quantize)
    for flag, value in (("--limit", args.limit), ("--chunk", args.chunk)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    _check_numbers(args)
    task = get_task(args.task)
    paths = expand_models(args.model)
    # The data, the few-shot pool and every model path are checked before any model loads.
    items = load_items(task, args.data, args.format, args.limit)
    pool, same_file = [], args.fewshot_data is None
    if args.shots:
        pool = load_items(task, args.fewshot_data or args.data, args.format)
        same_file = same_file or os.path.samefile(args.fewshot_data, args.data)
        check_shots(args.shots, pool, same_file, args.fewshot_data or args.data)
    for path in paths:
        directory_kind(path)
    tokenizer = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    spec = EvalSpec(task=task.name, data=os.path.abspath(args.data),
                    fewshot_data=None if same_file or not args.shots
                    else os.path.abspath(args.fewshot_data),
                    shots=args.shots, format=args.format, truncate=args.truncate_context,
                    quantize=args.quantize)

    summaries = []
    for path, label in zip(paths, model_labels(paths)):
        model, mesh = load_for_inference(argparse.Namespace(**{**vars(args), "model": path}))
        model_tokenizer = tokenizer or model.tokenizer
        if model_tokenizer is None:
            raise UserError(f"{path}: no tokenizer files; pass --tokenizer DIR")
        out_dir = os.path.join(args.out, label, task.name)
        summary = evaluate(GroupedScorer(model, mesh=mesh, batch_size=args.batch_size,
                                           attention=args.attention),
                           model_tokenizer, items, pool, spec, out_dir, model_path=path,
                           chunk_items=args.chunk, prefix_cache=args.prefix_cache == "on")
        summaries.append({"label": label, **summary})
        print(f"{label}: {task.title} acc {summary['acc']:.4f} acc_norm "
              f"{summary['acc_norm']:.4f} (n={summary['n']}) -> {out_dir}", file=sys.stderr)
    table = comparison_table(summaries)
    if not is_writer():
        return 0
    print(table)
    write_json(os.path.join(args.out, f"comparison_{task.name}.json"), summaries)
    with atomic_file(os.path.join(args.out, f"comparison_{task.name}.md")) as f:
        f.write(table + "\n")
    return 0
