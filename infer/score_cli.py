"""``meditron-jax score``: log-likelihood of continuations, as a resumable sweep.

Input lines: ``{"id", "context" | "context_ids", "continuation" | "continuation_ids"}``.
Output lines: ``{"id", "logprob", "num_tokens", "greedy"}``: the sum of the
continuation tokens' log-probabilities, their number, and whether each was the argmax.
A rerun resumes only under the same model and settings (``--overwrite`` starts over).
"""
from __future__ import annotations

import argparse
import sys

from infer.cli_common import (add_model_arguments, add_sweep_output_arguments, inference_mesh,
                               load_for_inference, open_sweep_output)
from infer.score import ScoreRequest, Scorer, encode_pair
from infer.sweep import read_requests, run_sweep
from meditron_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, metavar="FILE.jsonl",
                        help='JSONL lines {"id", "context"|"context_ids", '
                             '"continuation"|"continuation_ids"}')
    add_sweep_output_arguments(parser, required=True)
    parser.add_argument("--truncate-context", action="store_true",
                        help="drop the oldest context tokens of requests too long for the "
                             "model, instead of failing")


def _field(record: dict, name: str, where: str):
    """("text", str) or ("ids", list[int]) for ``name`` / ``name_ids``."""
    has_text, has_ids = name in record, f"{name}_ids" in record
    if has_text == has_ids:
        raise UserError(f'{where}: give exactly one of "{name}" (text) or "{name}_ids" '
                        "(token ids)")
    if has_text:
        value = record[name]
        if not isinstance(value, str) or not value:
            raise UserError(f'{where}: "{name}" must be a non-empty string')
        return "text", value
    value = record[f"{name}_ids"]
    if not isinstance(value, list) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise UserError(f'{where}: "{name}_ids" must be a non-empty list of integers')
    return "ids", value


def parse_request(record: dict, where: str) -> tuple:
    return record["id"], where, _field(record, "context", where), \
        _field(record, "continuation", where)


def to_request(parsed: tuple, tokenizer, model_path: str) -> ScoreRequest:
    rid, where, (ctx_kind, ctx), (cont_kind, cont) = parsed
    if "text" in (ctx_kind, cont_kind) and tokenizer is None:
        raise UserError(f"{where}: text fields but {model_path} has no tokenizer; give "
                        "context_ids / continuation_ids or add tokenizer.json")
    if ctx_kind == cont_kind == "text":
        ctx, cont = encode_pair(tokenizer, ctx, cont)
    elif ctx_kind == "text":
        ctx = tokenizer.encode(ctx)
    elif cont_kind == "text":
        cont = tokenizer.encode(cont, add_bos=False)
    return ScoreRequest(id=rid, context_ids=tuple(ctx), continuation_ids=tuple(cont))


def run(args: argparse.Namespace) -> int:
    parsed = read_requests(args.input, parse_request)
    mesh = inference_mesh(args)
    with open_sweep_output(args, "score", args.input) as out:
        return _score(args, parsed, mesh, out)


def _score(args: argparse.Namespace, parsed: list, mesh, out) -> int:
    model, mesh = load_for_inference(args, mesh)
    scorer = Scorer(model, mesh=mesh, batch_size=args.batch_size, attention=args.attention)
    requests = [scorer.check(to_request(p, model.tokenizer, args.model),
                             truncate=args.truncate_context) for p in parsed]
    # Similar lengths share a bucket; each batch is still written as soon as it is done.
    requests.sort(key=lambda r: len(r.context_ids) + len(r.continuation_ids))

    def process(batch: list[ScoreRequest]):
        results = scorer.score(batch)
        records = [{"id": r.id, "logprob": r.logprob, "num_tokens": r.num_tokens,
                    "greedy": r.greedy} for r in results]
        return records, sum(len(q.context_ids) + len(q.continuation_ids) for q in batch)

    stats = run_sweep(requests, key=lambda r: r.id, batch_size=args.batch_size,
                      process=process, out=out)
    print(stats.summary("requests"), file=sys.stderr)
    return 0
