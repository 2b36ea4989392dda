"""``meditron-jax generate``: one prompt streamed to the terminal, or a resumable sweep
over a JSONL file of prompts.

Input lines: ``{"id": ..., "prompt": "text"}`` or ``{"id": ..., "prompt_ids": [ints]}``;
with ``--chat``, ``{"id": ..., "messages": [...]}`` rendered with the checkpoint's chat
template (:mod:`infer.chat_prompts`).
Output lines: ``{"id", "completion", "completion_ids", "finish_reason"}``, appended in
input order as prompts finish (continuous batching, :mod:`infer.batching`); rerunning
after a kill skips ids already in ``--out``, and only under the same model and settings
(:func:`infer.cli_common.open_sweep_output`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from typing import Any

import jax

from infer.cli_common import (add_model_arguments, add_sweep_output_arguments, inference_mesh,
                               load_for_inference, open_sweep_output)
from infer import chat_prompts
from infer.engine import Completion, Generator, fit_prompt
from infer.sampling import Sampling
from infer.batching import ContinuousEngine, EngineRequest
from infer.sweep import (ResumableOutput, SweepStats, id_seed, read_requests,
                         run_streaming_sweep)
from meditron_jax.errors import UserError
from meditron_jax.model import unstack_layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt; the completion streams "
                                                        "to the terminal")
    source.add_argument("--prompts", metavar="FILE.jsonl",
                        help='JSONL lines {"id", "prompt"} or {"id", "prompt_ids"}')
    source.add_argument("--chat", metavar="FILE.jsonl",
                        help='JSONL lines {"id", "messages"}: each conversation rendered with '
                             "the checkpoint's chat template (generation prompt added)")
    add_sweep_output_arguments(parser, required=False, without="; none: JSONL to stdout")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="tokens to generate per prompt (at most)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus mass in (0, 1]; 1 = off")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="sampling seed (each prompt's stream also depends on its id)")
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                        help="stop strings (in addition to the checkpoint's eos tokens)")
    parser.add_argument("--truncate-prompt", action="store_true",
                        help="keep the last tokens of prompts too long for max length, "
                             "instead of failing")
    parser.add_argument("--layers", choices=("auto", "stacked", "per-layer"), default="auto",
                        help="how the decode step holds the layers' weights: stacked (one "
                             "scan) or per-layer (the same arrays split, an unrolled loop: "
                             "XLA:CPU copies a scanned layer's weights every step); auto: "
                             "per-layer on one CPU device without --mesh")


@dataclasses.dataclass
class PromptItem:
    id: Any
    where: str                 # "FILE:LINE", for error messages
    text: str | None = None
    ids: list[int] | None = None


def parse_prompt(record: dict, where: str) -> PromptItem:
    has_text, has_ids = "prompt" in record, "prompt_ids" in record
    if has_text == has_ids:
        raise UserError(f'{where}: give exactly one of "prompt" (text) or "prompt_ids" '
                        "(token ids)")
    item = PromptItem(id=record["id"], where=where)
    if has_text:
        if not isinstance(record["prompt"], str):
            raise UserError(f'{where}: "prompt" must be a string')
        if not record["prompt"].strip():
            raise UserError(f"{where}: empty prompt")
        item.text = record["prompt"]
    else:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError(f'{where}: "prompt_ids" must be a list of integers')
        if not ids:
            raise UserError(f"{where}: empty prompt_ids")
        item.ids = ids
    return item


def _sampling(args) -> Sampling:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _tokenize(items: list[PromptItem], model, args) -> None:
    """Token ids for every prompt, all checked (range, length) before any generation."""
    for item in items:
        if item.ids is None:
            if model.tokenizer is None:
                raise UserError(f"{item.where}: text prompt but {args.model} has no tokenizer; "
                                "give prompt_ids or add tokenizer.json")
            item.ids = model.tokenizer.encode(item.text)
        item.ids = fit_prompt(item.ids, args.max_new_tokens, model.cfg,
                              truncate=args.truncate_prompt, label=item.where)


def run(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    if args.out and not (args.prompts or args.chat):
        raise UserError("--out goes with --prompts (a sweep); --prompt streams to the terminal")
    if args.overwrite and not args.out:
        raise UserError("--overwrite goes with --out")
    template = chat_prompts.load_template(args.model) if args.chat else None
    items = read_requests(args.chat, chat_prompts.parse_chat_record) if args.chat else \
        read_requests(args.prompts, parse_prompt) if args.prompts else [
        PromptItem(id=0, where="--prompt", text=args.prompt)]
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt: empty prompt")
    if args.layers == "per-layer" and args.mesh:
        raise UserError("--layers per-layer runs on one device; drop --mesh")
    mesh = inference_mesh(args)
    with (open_sweep_output(args, "generate", args.prompts or args.chat) if args.out
          else contextlib.nullcontext()) as out:
        return _generate(args, items, sampling, mesh, out, template)


def _generate(args, items: list[PromptItem], sampling: Sampling, mesh,
              out: ResumableOutput | None, template=None) -> int:
    model, mesh = load_for_inference(args, mesh)
    if args.layers == "per-layer" or (
            args.layers == "auto" and mesh is None and jax.default_backend() == "cpu"):
        # the stacked arrays are freed as their per-layer copies appear
        model = dataclasses.replace(model, params=unstack_layers(model.params, consume=True))
    if args.stop and model.tokenizer is None:
        raise UserError(f"--stop needs a tokenizer; {args.model} has none")
    if template is not None:
        chat_prompts.render(items, template, model.tokenizer, args.model)
    _tokenize(items, model, args)
    if args.prompt is not None:
        generator = Generator(model, mesh, args.batch_size, attention=args.attention)
        return _stream(generator, items[0], dict(
            max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
            stop_strings=args.stop))
    return _sweep(args, model, mesh, items, sampling, out)


def _sweep(args, model, mesh, items: list[PromptItem], sampling: Sampling,
           out: ResumableOutput | None) -> int:
    """Every prompt through continuous batching (``--batch-size`` slots, each refilled as
    its row finishes); results are written as they finish, ``--batch-size`` at a time."""
    longest = max(len(it.ids) for it in items)
    engine = ContinuousEngine(model, mesh, slots=args.batch_size, attention=args.attention,
                              max_len=min(longest + args.max_new_tokens,
                                          model.cfg.max_position_embeddings),
                              seed=args.seed, queue_size=max(1, len(items)))

    def run(pending: list[PromptItem], done):
        engine.generate([EngineRequest(it.ids, args.max_new_tokens, sampling,
                                       seed=id_seed(it.id), stop_strings=tuple(args.stop))
                         for it in pending],
                        on_done=lambda i, c: done(i, _record(pending[i], c), len(c.ids)))

    stats = run_streaming_sweep(items, key=lambda it: it.id, flush_every=args.batch_size,
                                run=run, out=out, emit=None if out else _print_records)
    print(stats.summary(), file=sys.stderr)
    return 0


def _record(item: PromptItem, c: Completion) -> dict:
    return {"id": item.id, "completion": c.text, "completion_ids": c.ids,
            "finish_reason": c.finish_reason}


def _print_records(records) -> None:
    if jax.process_index() != 0:   # multi-host: every process has every result
        return
    for r in records:
        print(json.dumps(r, ensure_ascii=False), flush=True)


class TextStream:
    """Turns growing token ids into printable text increments: text that could still
    change (an unfinished UTF-8 character, the start of a stop string) is held back."""

    def __init__(self, decode, stop_strings):
        self.decode, self.stops = decode, list(stop_strings)
        self.ids: list[int] = []
        self.printed = ""

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.decode(self.ids)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            text = text[:min(hits)]
        text = text.rstrip("\ufffd")
        hold = max((n for s in self.stops for n in range(1, len(s))
                    if text.endswith(s[:n])), default=0)
        return self._advance(text[:len(text) - hold])

    def finish(self, final: str) -> str:
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new


def _stream(generator: Generator, item: PromptItem, options: dict) -> int:
    stream = TextStream(generator.model.tokenizer.decode, options["stop_strings"])
    start = time.perf_counter()
    completion = generator.generate(
        [item.ids], on_tokens=lambda _, ids: print(stream.push(ids), end="", flush=True),
        **options)[0]
    stats = SweepStats(total=1, done=1, tokens=len(completion.ids),
                       seconds=time.perf_counter() - start)
    print(stream.finish(completion.text or ""), flush=True)
    print(f"{stats.summary()} finish_reason={completion.finish_reason}", file=sys.stderr)
    return 0
