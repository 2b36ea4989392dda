"""EleutherAI lm-eval harness driving a meditron-jax model (``pip install .[eval]``).

From Python::

    from infer.lm_eval_adapter import MeditronLM
    lm_eval.simple_evaluate(model=MeditronLM("ckpt/"), tasks=["medqa_4options"])

From the shell, with lm-eval's own options (this module registers the model name
``meditron-jax`` and hands over to lm-eval's command line)::

    python -m infer.lm_eval_adapter run --model meditron-jax \\
        --model_args path=ckpt/,mesh=tensor=4 --batch_size 16 --tasks pubmedqa

Scoring goes through :class:`~infer.grouped_score.GroupedScorer` (the options of a
question share one context pass) and generation through
:class:`~infer.engine.Generator`, sharded on the given mesh; requests are tokenized
exactly as ``meditron-jax eval`` tokenizes them (:func:`infer.score.encode_pair`), so
the two report the same per-item log-likelihoods. lm-eval's ``model_args`` are split
on commas, so a mesh with several axes is written with ``+``: ``mesh=data=2+tensor=4``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from meditron_jax.errors import UserError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # the optional extra is not installed
    raise ImportError("the lm-eval adapter needs lm-eval: pip install 'meditron-jax[eval]'") from exc

from infer.cli_common import load_for_inference
from infer.engine import Generator
from infer.sampling import Sampling
from infer.grouped_score import GroupedScorer, ScoreGroup
from infer.score import ScoreRequest, encode_pair
from meditron_jax.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256
MAX_GROUP = 16  # options scored on one shared context pass (they are repeated in memory)


def split_request(tokenizer, context: str, continuation: str, *,
                  prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's convention, a word-boundary space belongs to the continuation (trailing
    spaces move over), then the split ``meditron-jax eval`` uses; an empty context
    conditions on ``prefix`` (bos) alone."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx, cont = encode_pair(tokenizer, context, continuation)
    return (ctx or [prefix]), cont


@register_model("meditron-jax")
class MeditronLM(LM):
    """lm-eval ``LM`` over a meditron-jax model (HF snapshot or native checkpoint)."""

    def __init__(self, path: str | None = None, *, model=None, mesh=None,
                 batch_size: int | str | None = 8, max_length: int | None = None,
                 dtype: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 tokenizer: str | None = None, pretrained: str | None = None,
                 device: str | None = None, max_batch_size: int | None = None, **unused):
        # ``pretrained`` is lm-eval's usual name for the path; ``device`` and
        # ``max_batch_size`` come from lm-eval's own flags and mean nothing here (the
        # mesh places the model).
        super().__init__()
        if unused:
            raise UserError(f"meditron-jax model_args: unknown {', '.join(sorted(unused))}; "
                            "use path, mesh, batch_size, max_length, dtype, max_gen_toks, "
                            "tokenizer")
        path = path or pretrained
        if batch_size is None or str(batch_size).startswith("auto"):
            batch_size = 8  # lm-eval's "auto" probes memory by trial and error
        if isinstance(batch_size, bool) or not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"meditron-jax batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        if model is None:
            if path is None:
                raise UserError("meditron-jax model_args: give path=<checkpoint directory>")
            spec = mesh.replace("+", ",") if isinstance(mesh, str) else None
            model, mesh = load_for_inference(argparse.Namespace(
                model=path, mesh=spec, batch_size=batch_size, dtype=dtype or "auto"))
        self.model, self.mesh = model, mesh
        self.tokenizer = Tokenizer.from_dir(tokenizer) if tokenizer else model.tokenizer
        if self.tokenizer is None:
            raise UserError(f"{model.path}: no tokenizer files; pass tokenizer=<dir>")
        self.batch_size = batch_size
        self.max_length = int(max_length or model.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = GroupedScorer(model, mesh=mesh, batch_size=self.batch_size)
        self._generator = None

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_ids[0]

    # ---- lm-eval's three request types ------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # A multiple-choice question arrives as one request per option, all with the
        # same context: group them (at most MAX_GROUP a group) so the context runs once.
        by_context: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, r in enumerate(requests):
            ctx, cont = split_request(self.tokenizer, *r.args, prefix=self.prefix_token_id)
            by_context.setdefault(tuple(ctx), []).append((i, cont))
        members = [m[s:s + MAX_GROUP] for m in by_context.values()
                   for s in range(0, len(m), MAX_GROUP)]
        contexts = [ctx for ctx, m in by_context.items() for _ in range(0, len(m), MAX_GROUP)]
        groups = [ScoreGroup(g, ctx, tuple(c for _, c in m))
                  for g, (ctx, m) in enumerate(zip(contexts, members))]
        out: list = [None] * len(requests)
        # truncate: like lm-eval, drop a too-long context's oldest tokens
        for m, results in zip(members, self.scorer.score_groups(groups, truncate=True)):
            for (i, _), r in zip(m, results):
                out[i] = (r.logprob, r.greedy)
        for instance, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", instance.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood after bos, in windows of ``max_length`` tokens where
        each window conditions on as much preceding text as fits (lm-eval's scheme)."""
        reqs, owner = [], []
        for i, instance in enumerate(requests):
            (text,) = instance.args
            windows = get_rolling_token_windows(
                token_list=self.tokenizer.encode(text, add_bos=False),
                prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
            for j, (ctx, cont) in enumerate(map(make_disjoint_window, windows)):
                reqs.append(ScoreRequest(id=f"{i}:{j}", context_ids=ctx, continuation_ids=cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, result in zip(owner, self.scorer.score(reqs, truncate=True)):
            totals[i] += float(result.logprob)
        for instance, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", instance.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation, greedy unless the task asks to sample; requests that share
        generation settings run batched together."""
        groups: dict[tuple, list[int]] = {}
        for i, instance in enumerate(requests):
            key = self._generation_settings(dict(instance.args[1] or {}))
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, max_new, temperature, top_p), rows in groups.items():
            prompts = [self.tokenizer.encode(requests[i].args[0]) for i in rows]
            completions = self.generator.generate(
                prompts, max_new_tokens=max_new, stop_strings=until, truncate=True,
                sampling=Sampling(temperature=temperature, top_p=top_p))
            for i, completion in zip(rows, completions):
                out[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generation_settings(self, kwargs: dict) -> tuple:
        until = kwargs.pop("until", None) or []
        until = tuple([until] if isinstance(until, str) else until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        top_p = float(kwargs.pop("top_p", 1.0)) if do_sample else 1.0
        return until, max_new, temperature, top_p

    @property
    def generator(self):
        if self._generator is None:
            self._generator = Generator(self.model, mesh=self.mesh, batch_size=self.batch_size)
        return self._generator


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with ``--model meditron-jax`` available."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except UserError as exc:
        print(f"meditron-jax (lm-eval): error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
