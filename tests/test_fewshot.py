"""Few-shot prompt building: exact layout, seeded selection without the asked question,
dropping examples to fit a token budget, bad input."""
from __future__ import annotations

import pytest

from infer.fewshot import (Example, FewShotFormat, build_prompt, choice_continuations,
                           format_choices, select_examples)
from meditron_jax.errors import UserError

POOL = [Example(format_choices(f"Question {i}?", [f"yes {i}", f"no {i}"]), "AB"[i % 2])
        for i in range(6)]


def test_layout_is_exact():
    fmt = FewShotFormat(instruction="The following are multiple choice questions about medicine.")
    prompt, used = build_prompt(POOL[:2], format_choices("Fever?", ["viral", "bacterial"]),
                                fmt=fmt)
    assert used == 2
    assert prompt == (
        "The following are multiple choice questions about medicine.\n\n"
        "Question: Question 0?\nA. yes 0\nB. no 0\nAnswer: A\n\n"
        "Question: Question 1?\nA. yes 1\nB. no 1\nAnswer: B\n\n"
        "Question: Fever?\nA. viral\nB. bacterial\nAnswer:")
    assert choice_continuations(3) == [" A", " B", " C"]
    zero, used = build_prompt([], "Is it?")
    assert zero == "Question: Is it?\nAnswer:" and used == 0


def test_selection_is_seeded_and_never_the_question():
    a = select_examples(POOL, 3, seed=1, exclude=POOL[0].question)
    assert a == select_examples(POOL, 3, seed=1, exclude=POOL[0].question)
    assert POOL[0] not in a and len(set(e.question for e in a)) == 3
    assert any(select_examples(POOL, 3, seed=s) != a for s in range(2, 6))
    assert len(select_examples(POOL, 5, seed=0, exclude=POOL[0].question)) == 5


def test_budget_drops_the_oldest_examples():
    words = lambda text: len(text.split())
    full, _ = build_prompt(POOL[:4], "Q?")
    prompt, used = build_prompt(POOL[:4], "Q?", max_tokens=words(full) - 1, count_tokens=words)
    assert used == 3 and prompt == build_prompt(POOL[1:4], "Q?")[0]
    with pytest.raises(UserError, match="the question alone is 3 tokens, over the budget of 2"):
        build_prompt(POOL[:4], "Q?", max_tokens=2, count_tokens=words)


def test_bad_input():
    with pytest.raises(UserError, match="only 5 are available"):
        select_examples(POOL, 6, seed=0, exclude=POOL[0].question)
    with pytest.raises(UserError, match="must be >= 0"):
        select_examples(POOL, -1, seed=0)
    with pytest.raises(UserError, match="needs 2..26 choices, got 1"):
        format_choices("Q?", ["only"])
    with pytest.raises(UserError, match="empty question"):
        build_prompt(POOL, "  ")
