"""Few-shot prompts for a base (not instruction-tuned) model.

A base model has no chat template: it continues text. So the task is shown by k solved
examples in one fixed plain-text layout, followed by the question with the answer left
open::

    The following are multiple choice questions about medicine.

    Question: ...
    A. ...
    B. ...
    Answer: B

    Question: ...
    A. ...
    B. ...
    Answer:

Scoring then compares the log-likelihood of each choice's continuation (`" A"`,
`" B"`, ...) after that context (:mod:`infer.score`). Examples are picked with a seeded
RNG (never the question itself) and, when a token budget is given, the oldest are
dropped until the prompt fits.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from meditron_jax.errors import UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class Example:
    question: str   # full question text (choices included, see format_choices)
    answer: str     # the answer as it should follow the answer prefix, e.g. "B"


@dataclasses.dataclass(frozen=True)
class FewShotFormat:
    instruction: str = ""             # printed once, before the examples
    question_prefix: str = "Question: "
    answer_prefix: str = "Answer:"
    separator: str = "\n\n"           # between blocks

    def block(self, question: str, answer: str | None = None) -> str:
        text = f"{self.question_prefix}{question.strip()}\n{self.answer_prefix}"
        return text if answer is None else f"{text} {answer.strip()}"

    def build(self, examples: Sequence[Example], question: str) -> str:
        blocks = [self.instruction.strip()] if self.instruction.strip() else []
        blocks += [self.block(e.question, e.answer) for e in examples]
        blocks.append(self.block(question))
        return self.separator.join(blocks)


def format_choices(question: str, choices: Sequence[str]) -> str:
    """``question`` followed by one ``"A. choice"`` line per choice."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise UserError(f"a multiple-choice question needs 2..{len(LETTERS)} choices, "
                        f"got {len(choices)}")
    lines = [question.strip()] + [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def choice_continuations(num_choices: int) -> list[str]:
    """The continuations to score after ``"Answer:"``: ``[" A", " B", ...]``."""
    return [f" {LETTERS[i]}" for i in range(num_choices)]


def select_examples(pool: Sequence[Example], k: int, *, seed: int,
                    exclude: str | None = None) -> list[Example]:
    """k examples drawn from ``pool`` with a seeded RNG, never one whose question is
    ``exclude`` (the question being asked)."""
    if k < 0:
        raise UserError(f"number of few-shot examples must be >= 0, got {k}")
    candidates = [e for e in pool if e.question.strip() != (exclude or "").strip()]
    if k > len(candidates):
        raise UserError(f"asked for {k} few-shot examples but only {len(candidates)} are "
                        "available; lower k or give a larger example pool")
    return random.Random(seed).sample(candidates, k)


def build_prompt(examples: Sequence[Example], question: str, *,
                 fmt: FewShotFormat = FewShotFormat(),
                 max_tokens: int | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> tuple[str, int]:
    """The prompt text and how many examples it kept. With ``max_tokens`` (and
    ``count_tokens``), examples are dropped from the front until the prompt fits."""
    if not question.strip():
        raise UserError("few-shot prompt: empty question")
    if (max_tokens is None) != (count_tokens is None):
        raise ValueError("give both max_tokens and count_tokens, or neither")
    examples = list(examples)
    while True:
        prompt = fmt.build(examples, question)
        if max_tokens is None or count_tokens(prompt) <= max_tokens:
            return prompt, len(examples)
        if not examples:
            raise UserError(f"the question alone is {count_tokens(prompt)} tokens, over the "
                            f"budget of {max_tokens}; raise the budget or shorten it")
        examples.pop(0)
