"""Few-shot multiple-choice evaluation: score every option, aggregate, compare checkpoints.

For each question every option is scored by the log-likelihood of ``" " + option``
after the few-shot context, the context computed once for all options
(:class:`~infer.grouped_score.GroupedScorer`), and the worked examples the questions
share computed once for all of them (``--prefix-cache``, :func:`shared_prefix`). The
metrics are lm-eval's: ``acc`` picks the option with the highest summed
log-likelihood, ``acc_norm`` divides it by the option's length in characters. Each
gets lm-eval's standard error and a 95% Wilson score interval, which (unlike
mean +- 1.96 se) stays inside [0, 1] and holds up for the few hundred items of a
benchmark subset.

Output per model and task, in ``OUT/<model>/<task>/``: ``items.jsonl`` (one line per
question, keyed by its position in the data file, appended durably chunk by chunk as
a :mod:`infer.sweep` output), ``settings.json`` (what produced it: resuming with other
settings is refused) and ``summary.json`` (written aside, then renamed). A killed run
resumes where it stopped and counts every item once.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import numpy as np

from infer.eval_tasks import TARGET_DELIMITER, Item, fewshot_context, pick_shots
from infer.grouped_score import GroupedScorer, ScoreGroup
from infer.score import encode_pair
from infer.sweep import ResumableOutput, check_settings, run_sweep
from meditron_jax.atomic import write_json
from meditron_jax.jsonl import read_jsonl
from meditron_jax.io.loading import model_fingerprint

Z95 = 1.959963984540054


# ---- metrics ---------------------------------------------------------------------------------
def item_result(item: Item, lls: Sequence[float], num_tokens: Sequence[int],
                greedy: Sequence[bool]) -> dict:
    """One question's record: per-option log-likelihoods and both predictions."""
    lls = np.asarray(lls, np.float64)
    chars = np.array([len(c) for c in item.choices], np.float64)
    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / chars))
    return {"id": item.index, "source_id": item.id, "gold": item.gold, "pred": pred,
            "pred_norm": pred_norm, "acc": int(pred == item.gold),
            "acc_norm": int(pred_norm == item.gold), "loglikelihoods": lls.tolist(),
            "num_tokens": [int(n) for n in num_tokens], "greedy": [bool(g) for g in greedy]}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def stderr_of_mean(values: Sequence[int]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); None below n=2."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(n))


def summarize(records: Sequence[dict]) -> dict:
    out: dict = {"n": len(records)}
    for metric in ("acc", "acc_norm"):
        hits = [int(r[metric]) for r in records]
        out[metric] = sum(hits) / len(hits) if hits else None
        out[f"{metric}_stderr"] = stderr_of_mean(hits)
        out[f"{metric}_ci95"] = list(wilson_interval(sum(hits), len(hits)))
    return out


# ---- one model, one task ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What defines a run's results (a resume must match it)."""
    task: str
    data: str
    fewshot_data: str | None  # None: the data file itself, an item never its own example
    shots: int
    format: str
    truncate: bool = False    # drop a too-long context's oldest tokens instead of failing
    quantize: str | None = None  # int8 weights change the scores

    def describe(self) -> dict:
        """Settings a resume must match; ``quantize`` only when set, so runs recorded before
        the option existed resume."""
        out = dataclasses.asdict(self)
        if out["quantize"] is None:
            del out["quantize"]
        return out


def build_groups(items: Sequence[Item], pool: Sequence[Item], spec: EvalSpec,
                 tokenizer) -> list[ScoreGroup]:
    """One group per item: its few-shot context and every option's continuation."""
    groups = []
    for item in items:
        shots = pick_shots(item, pool, spec.shots, spec.fewshot_data is None)
        context = fewshot_context(item, shots)
        # encode_pair's context ids depend on the context alone: one for all options.
        pairs = [encode_pair(tokenizer, context, TARGET_DELIMITER + c) for c in item.choices]
        groups.append(ScoreGroup(item.index, pairs[0][0], tuple(cont for _, cont in pairs)))
    return groups


def shared_prefix(items: Sequence[Item], pool: Sequence[Item], spec: EvalSpec,
                  tokenizer) -> tuple[int, ...] | None:
    """Token ids most contexts start with: the header and worked examples that the most
    items share (the shots are the pool's first ones, so all but the items among them
    share one block; those share part of it). None when no two items share a block."""
    blocks: dict[str, int] = {}
    for item in items:
        shots = pick_shots(item, pool, spec.shots, spec.fewshot_data is None)
        context = fewshot_context(item, shots)
        block = context[:len(context) - len(item.text)]
        blocks[block] = blocks.get(block, 0) + 1
    block, count = max(blocks.items(), key=lambda kv: kv[1], default=("", 0))
    if count < 2 or not block:
        return None
    return tuple(tokenizer.encode(block))


def is_writer() -> bool:
    """Process 0 writes the files; on a multi-host run every process computes the same
    batches, reads what is there, and agrees on what is left (see :mod:`infer.sweep`)."""
    return jax.process_index() == 0


def evaluate(scorer: GroupedScorer, tokenizer, items: Sequence[Item], pool: Sequence[Item],
             spec: EvalSpec, out_dir: str, *, model_path: str, chunk_items: int = 32,
             prefix_cache: bool = True) -> dict:
    """Score the items not yet in ``out_dir/items.jsonl`` (each chunk of
    ``chunk_items`` appended durably), then summarize all of them into ``summary.json``.

    ``prefix_cache``: run the few-shot block the items share once and score each
    question on top of its KV cache (:meth:`GroupedScorer.score_groups`). It changes no
    result, so it is not part of the settings a resume must match."""
    os.makedirs(out_dir, exist_ok=True)
    items_path = os.path.join(out_dir, "items.jsonl")
    check_settings(os.path.join(out_dir, "settings.json"),
                   {**spec.describe(), "model": model_fingerprint(model_path)}, label=out_dir,
                   hint="give another --out", has_results=os.path.exists(items_path),
                   write=is_writer())
    by_index: dict[int, dict] = {}  # every item's record: earlier runs' and this one's
    prefix = shared_prefix(items, pool, spec, tokenizer) if prefix_cache else None

    def process(chunk: list[Item]) -> tuple[list[dict], int]:
        groups = build_groups(chunk, pool, spec, tokenizer)
        scored = scorer.score_groups(groups, truncate=spec.truncate, prefix=prefix)
        records = [item_result(item, [r.logprob for r in per], [r.num_tokens for r in per],
                               [r.greedy for r in per])
                   for item, per in zip(chunk, scored)]
        by_index.update((r["id"], r) for r in records)
        return records, sum(len(g.context_ids) + sum(map(len, g.continuations)) for g in groups)

    with ResumableOutput(items_path) as out:
        if os.path.exists(items_path):
            by_index.update((rec["id"], rec)
                            for _, rec in read_jsonl(items_path, skip_torn_tail=True))
        stats = run_sweep(items, key=lambda it: it.index, batch_size=chunk_items,
                          process=process, out=out)
    summary = {**spec.describe(), "model": model_path,
               **summarize([by_index[it.index] for it in items]),
               "scored_now": stats.done, "resumed": stats.skipped,
               "tokens_per_s": stats.tokens / stats.seconds if stats.seconds else None}
    if is_writer():
        write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


# ---- several checkpoints ------------------------------------------------------------------------
def comparison_table(summaries: Sequence[dict]) -> str:
    """A Markdown table, one row per model: accuracies with their 95% intervals."""
    def cell(s, m):
        lo, hi = s[f"{m}_ci95"]
        return f"{100 * s[m]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    lines = ["| model | task | n | acc % [95% CI] | acc_norm % [95% CI] |",
             "|---|---|---:|---|---|"]
    lines += [f"| {s['label']} | {s['task']} | {s['n']} | {cell(s, 'acc')} | "
              f"{cell(s, 'acc_norm')} |" for s in summaries]
    return "\n".join(lines)
