"""Medical multiple-choice benchmarks: their public file formats and their prompts.

Each task turns one record of the format users already have (MedQA, MedMCQA,
PubMedQA, MMLU; JSONL, JSON or parquet) into an :class:`Item`: the question rendered
without its answer, the answer choices, and the gold index. Prompts follow
EleutherAI lm-eval's templates for the same benchmarks (``medqa_4options``,
``medmcqa``, ``pubmedqa``, ``mmlu``; ``mmlu_continuation`` for the cloze format), and
few-shot contexts are assembled the way lm-eval assembles them, so scores are
comparable with published lm-eval numbers and the lm-eval adapter sees the same
strings.

Two formats: ``mcq`` lists the options in the prompt and scores the letters (lm-eval's
default for these tasks); ``cloze`` scores each option's text after
``Question: ...\\nAnswer:``, which gives a signal much earlier in (continued)
pretraining and makes length-normalized accuracy meaningful.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

from meditron_jax.errors import UserError
from meditron_jax.jsonl import read_jsonl

FORMATS = ("mcq", "cloze")
TARGET_DELIMITER = " "      # between a question and its answer (lm-eval's default)
FEWSHOT_DELIMITER = "\n\n"  # after each worked example (lm-eval's default)
LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class Item:
    index: int                 # position in the source file: the resume key
    id: str                    # the record's own id where it has one
    text: str                  # the question as the template renders it, without the answer
    choices: tuple[str, ...]   # each scored after TARGET_DELIMITER
    gold: int
    description: str = ""      # task header put before the few-shot examples (MMLU)

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    title: str
    fields: tuple[str, ...]  # required fields, named in errors
    # record, "FILE:LINE" -> (question, options, gold index, header)
    parse: Callable[[dict, str], tuple[str, list[str], int, str]]
    mcq: Callable[[str, list[str]], str]  # question, options -> prompt text
    letters: bool = True  # mcq scores letters; False: the options are the answers (PubMedQA)


# ---- field access -----------------------------------------------------------------------
def _field(rec: dict, name: str, where: str, task: str, fields: tuple[str, ...]):
    if name not in rec:
        raise UserError(f"{where}: missing field {name!r} ({task} records need "
                        f"{', '.join(fields)}); check --task matches the file")
    return rec[name]


def _text(value, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
    return value


def _index(value, n: int, name: str, where: str, options: str) -> int:
    """A 0-based answer index given as an int or an option letter."""
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    raise UserError(f"{where}: answer key {name}={value!r} is outside the options ({options})")


# ---- the four formats --------------------------------------------------------------------
def _medqa(rec, where):
    fields = MEDQA.fields
    question = _text(_field(rec, "question", where, "MedQA", fields), "question", where)
    options = _field(rec, "options", where, "MedQA", fields)
    if not isinstance(options, dict) or len(options) < 2:
        raise UserError(f"{where}: field 'options' must be an object like "
                        '{"A": "...", "B": "..."}' f", got {options!r:.60}")
    keys = sorted(options)
    if keys != list(LETTERS[:len(keys)]):
        raise UserError(f"{where}: option keys must be A, B, C, ... in order, got {', '.join(keys)}")
    texts = [_text(options[k], f"options.{k}", where) for k in keys]
    key = _field(rec, "answer_idx", where, "MedQA", fields)
    if key not in options:
        raise UserError(f"{where}: answer key answer_idx={key!r} is outside the options "
                        f"({', '.join(keys)})")
    return question, texts, keys.index(key), ""


def _medmcqa(rec, where):
    fields = MEDMCQA.fields
    question = _text(_field(rec, "question", where, "MedMCQA", fields), "question", where)
    texts = [_text(_field(rec, f, where, "MedMCQA", fields), f, where)
             for f in ("opa", "opb", "opc", "opd")]
    gold = _index(_field(rec, "cop", where, "MedMCQA", fields), 4, "cop", where,
                  "0..3, 0-based as in the Hugging Face release; subtract 1 from the "
                  "original 1-based files")
    return question, texts, gold, ""


PUBMEDQA_ANSWERS = ("yes", "no", "maybe")


def _pubmedqa(rec, where):
    fields = PUBMEDQA.fields
    question = _text(_field(rec, "QUESTION", where, "PubMedQA", fields), "QUESTION", where)
    contexts = _field(rec, "CONTEXTS", where, "PubMedQA", fields)
    if isinstance(contexts, str):
        contexts = [contexts]
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise UserError(f"{where}: field 'CONTEXTS' must be a list of strings")
    decision = _field(rec, "final_decision", where, "PubMedQA", fields)
    if not isinstance(decision, str) or decision.strip().lower() not in PUBMEDQA_ANSWERS:
        raise UserError(f"{where}: answer key final_decision={decision!r} is outside the "
                        "options (yes, no, maybe)")
    body = "Abstract: " + "\n".join(contexts) + "\nQuestion: " + question
    return body, list(PUBMEDQA_ANSWERS), PUBMEDQA_ANSWERS.index(decision.strip().lower()), ""


def _mmlu(rec, where):
    fields = MMLU.fields
    question = _text(_field(rec, "question", where, "MMLU", fields), "question", where)
    choices = _field(rec, "choices", where, "MMLU", fields)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise UserError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} strings")
    texts = [_text(c, f"choices[{i}]", where) for i, c in enumerate(choices)]
    gold = _index(_field(rec, "answer", where, "MMLU", fields), len(texts), "answer", where,
                  f"0..{len(texts) - 1} or A..{LETTERS[len(texts) - 1]}")
    subject = rec.get("subject")
    about = f" about {subject.replace('_', ' ')}" if isinstance(subject, str) and subject else ""
    header = f"The following are multiple choice questions (with answers){about}.\n\n"
    return question.strip(), texts, gold, header


def _lettered(question: str, options: list[str], preamble: str = "") -> str:
    listed = "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options))
    return f"{question}\n{preamble}{listed}Answer:"


MEDQA = Task("medqa", "MedQA", ("question", "options", "answer_idx"), _medqa,
             lambda q, o: "Question: " + _lettered(q, o))
MEDMCQA = Task("medmcqa", "MedMCQA", ("question", "opa", "opb", "opc", "opd", "cop"), _medmcqa,
               lambda q, o: "Question: " + _lettered(q, o, "Choices:\n"))
PUBMEDQA = Task("pubmedqa", "PubMedQA", ("QUESTION", "CONTEXTS", "final_decision"), _pubmedqa,
                lambda body, o: body + "\nAnswer:", letters=False)
MMLU = Task("mmlu", "MMLU", ("question", "choices", "answer"), _mmlu, _lettered)
TASKS: dict[str, Task] = {t.name: t for t in (MEDQA, MEDMCQA, PUBMEDQA, MMLU)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def make_item(task: Task, rec, index: int, where: str, fmt: str = "mcq") -> Item:
    """One record -> an Item in the given prompt format."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question, options, gold, header = task.parse(rec, where)
    if fmt == "cloze" and task.letters:
        text, choices = f"Question: {question}\nAnswer:", tuple(options)
    else:
        text = task.mcq(question, options)
        choices = tuple(LETTERS[:len(options)]) if task.letters else tuple(options)
    rid = rec.get("id", rec.get("pubid", index))
    return Item(index=index, id=str(rid), text=text, choices=choices, gold=gold,
                description=header)


# ---- reading the files users have ---------------------------------------------------------
def read_records(path: str) -> list[tuple[str, str | None, dict]]:
    """``(where, own_id, record)`` for each record of a JSONL, JSON or parquet file.

    JSON may be a list of records or, as PubMedQA's ``ori_pqal.json``, an object
    mapping ids to records."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; give a .jsonl, .json or .parquet benchmark file")
    if path.endswith(".parquet"):
        return [(f"{path} row {i + 1}", None, r) for i, r in enumerate(_read_parquet(path))]
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if isinstance(data, dict):
            return [(f"{path} record {k!r}", str(k), r) for k, r in data.items()]
        if isinstance(data, list):
            return [(f"{path} record {i + 1}", None, r) for i, r in enumerate(data)]
        raise UserError(f"{path}: expected a list of records or an object of id -> record")
    return [(f"{path}:{line}", None, r) for line, r in read_jsonl(path)]


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None


def load_items(task: Task, path: str, fmt: str = "mcq", limit: int | None = None) -> list[Item]:
    """Items of a benchmark file, in file order (the first ``limit`` when given)."""
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    items = []
    for i, (where, own_id, rec) in enumerate(records):
        item = make_item(task, rec, i, where, fmt)
        items.append(dataclasses.replace(item, id=own_id) if own_id is not None else item)
    if not items:
        raise UserError(f"{path}: no records")
    return items


# ---- prompts --------------------------------------------------------------------------------
def fewshot_context(item: Item, shots: list[Item]) -> str:
    """The scoring context: header, worked examples, then the question (lm-eval's layout)."""
    examples = "".join(s.text + TARGET_DELIMITER + s.answer + FEWSHOT_DELIMITER for s in shots)
    return item.description + examples + item.text


def pick_shots(item: Item, pool: Sequence[Item], k: int, same_file: bool) -> list[Item]:
    """The first ``k`` pool items; an item never serves as its own example when the pool
    is the evaluated file (lm-eval's ``first_n`` sampler does the same)."""
    shots: list[Item] = []
    for candidate in pool:
        if len(shots) == k:
            break
        if not (same_file and candidate.index == item.index):
            shots.append(candidate)
    return shots


def check_shots(k: int, pool: list[Item], same_file: bool, pool_path: str) -> None:
    available = len(pool) - (1 if same_file else 0)
    if k < 0:
        raise UserError(f"--shots must be >= 0, got {k}")
    if k > available:
        raise UserError(f"--shots {k} is larger than the few-shot pool ({available} examples "
                        f"in {os.path.basename(pool_path)}"
                        f"{', not counting the item itself' if same_file else ''}); "
                        "lower --shots or give a bigger --fewshot-data")
