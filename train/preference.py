"""Preference pairs: ``{"prompt" | "messages", "chosen", "rejected"}`` -> [B, 2, T] batches.

Every file is read and validated before training starts: a pair whose chosen equals its
rejected answer, an empty field or turn, an unknown role, a conversation that does not end
on a user (or tool) turn, or a chat template that fails to render it is one line naming
the file and line. ``messages`` are rendered with the checkpoint's chat template (or
``data.chat_template``): the prompt with the generation prompt, and the prompt plus each
answer as the assistant's next turn; as in TRL, the answer's tokens start where the
token ids of the prompt and of prompt + answer diverge. A plain ``prompt`` is encoded
as SFT encodes it: bos + prompt, then the answer + eos.

A pair is one example ``[2, seq_len]`` (row 0 chosen, row 1 rejected; right-padded, one
sequence per row, segment id 0 on padding) with ``weights`` 1 on the answer's target
tokens. A pair longer than ``seq_len`` is truncated (a pair cannot be split; counted and
reported); one left without an answer token in either row is skipped (counted). Batches
come from grain like the SFT loader's, so the data position is saved in every checkpoint
and a resumed run sees the batches an uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import grain
import numpy as np

from meditron_jax.errors import UserError
from meditron_jax.jsonl import read_jsonl
from meditron_jax.tokenizer.chat import check_messages
from train.config import DataSection
from train.data import GrainLoader

log = logging.getLogger("meditron_jax.train")
FIELDS = ("prompt", "messages", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A validated pair as text: plain (``chat`` False) or rendered by a chat template
    (``chosen``/``rejected`` then hold prompt + answer in full)."""
    prompt: str
    chosen: str
    rejected: str
    chat: bool
    where: str


# ---- reading and validating -----------------------------------------------------------------
def read_pairs(files, dcfg: DataSection, template=None, process_index: int = 0,
               process_count: int = 1) -> list[Pair]:
    """Validate every file completely; return this host's share of the pairs (pair ``i``
    goes to host ``i % process_count``). ``template()`` gives the chat template, asked for
    only when a record has ``messages``."""
    if not files:
        raise UserError("run config: data.train_files is empty; list JSONL preference files")
    pairs: list[Pair] = []
    for path in files:
        pairs.extend(_pairs_of(os.fspath(path), template))
    if not pairs:
        raise UserError(f"{', '.join(map(str, files))}: no preference pairs (the files are empty)")
    if len(pairs) < process_count:
        raise UserError(f"{len(pairs)} pairs cannot be shared by {process_count} hosts")
    return pairs[process_index::process_count]


def _pairs_of(path: str, template) -> list[Pair]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found")
    if not path.endswith((".jsonl", ".json")):
        raise UserError(f'{path}: preference data must be JSONL with "prompt" (or "messages"), '
                        '"chosen" and "rejected"')
    return [_pair(rec, f"{path}:{line_no}", template) for line_no, rec in read_jsonl(path)]


def _pair(rec: dict, where: str, template) -> Pair:
    has_prompt, has_messages = "prompt" in rec, "messages" in rec
    if has_prompt == has_messages:
        raise UserError(f'{where}: a pair needs exactly one of "prompt" (text) or "messages" '
                        f'(a conversation), beside "chosen" and "rejected"')
    answers = {}
    for key in ("chosen", "rejected"):
        value = rec.get(key)
        if not isinstance(value, str):
            what = "has no" if key not in rec else "has a non-string"
            raise UserError(f'{where}: pair {what} {key!r}; every line needs {{"prompt": "...", '
                            '"chosen": "...", "rejected": "..."}')
        if not value.strip():
            raise UserError(f"{where}: pair has an empty {key!r} answer")
        answers[key] = value
    if answers["chosen"].strip() == answers["rejected"].strip():
        raise UserError(f"{where}: chosen equals rejected; a pair must prefer one answer over a "
                        "different one")
    if has_prompt:
        prompt = rec["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: pair has {'an empty' if isinstance(prompt, str) else 'a non-string'}"
                            " 'prompt'")
        return Pair(prompt, answers["chosen"], answers["rejected"], False, where)
    messages = rec["messages"]
    check_messages(messages, where)
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{where}: messages end with an assistant turn; the conversation before "
                        "the answer ends with a user (or tool) turn, and chosen/rejected are the "
                        "assistant's next turn")
    tmpl = template() if template is not None else None
    if tmpl is None:
        raise UserError(f'{where}: "messages" need a chat template; set data.chat_template or '
                        'use a plain "prompt"')
    prompt = tmpl.render(messages, add_generation_prompt=True, where=where)
    full = {key: tmpl.render(list(messages) + [{"role": "assistant", "content": text}],
                             where=where) for key, text in answers.items()}
    return Pair(prompt, full["chosen"], full["rejected"], True, where)


def pair_texts(pair: Pair) -> list[str]:
    """The texts of a pair (to learn a BPE vocabulary from)."""
    if pair.chat:
        return [pair.chosen, pair.rejected]
    return [pair.prompt + pair.chosen, pair.prompt + pair.rejected]


# ---- tokenizing into examples ---------------------------------------------------------------
def _common_prefix(*seqs) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


class PairBuilder:
    """Pair -> ``{"inputs", "targets", "weights", "segment_ids", "positions"}`` of [2, T]
    (or None when an answer has no token within seq_len). ``counts`` describe the first
    pass over the ``num_records`` pairs, as :class:`train.data.ExampleBuilder`'s do."""

    def __init__(self, tokenizer, eos_id: int, dcfg: DataSection, num_records: int,
                 name: str = "train"):
        self.tokenizer, self.eos_id, self.dcfg, self.name = tokenizer, eos_id, dcfg, name
        self.num_records = num_records
        self.counts = {"records": 0, "overlong": 0, "dropped_tokens": 0, "unfit": 0}

    def ids(self, pair: Pair) -> tuple[list[int], list[int], list[int]]:
        """(prompt, chosen answer, rejected answer) token ids."""
        enc = self.tokenizer.encode
        if not pair.chat:
            return (enc(pair.prompt, add_bos=True), enc(pair.chosen, add_bos=False) + [self.eos_id],
                    enc(pair.rejected, add_bos=False) + [self.eos_id])
        p, c, r = (enc(t, add_bos=False) for t in (pair.prompt, pair.chosen, pair.rejected))
        n = _common_prefix(p, c, r)
        return p[:n], c[n:], r[n:]

    def example(self, pair: Pair) -> tuple[dict | None, int]:
        """The pair's example (None: nothing to train on), and its longer row's length in
        input tokens."""
        prompt, *answers = self.ids(pair)
        seq = self.dcfg.seq_len
        rows = {k: np.zeros((2, seq), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                          "positions")}
        rows["weights"] = np.zeros((2, seq), np.float32)
        longest, fits = 0, True
        for i, answer in enumerate(answers):
            ids = np.asarray(prompt + answer, np.int32)
            w = np.asarray([0.0] * len(prompt) + [1.0] * len(answer), np.float32)
            n = len(ids) - 1
            longest = max(longest, n)
            k = min(n, seq)
            rows["inputs"][i, :k] = ids[:-1][:k]
            rows["targets"][i, :k] = ids[1:][:k]
            rows["weights"][i, :k] = w[1:][:k]
            rows["segment_ids"][i, :k] = 1
            rows["positions"][i, :k] = np.arange(k)
            fits = fits and bool(rows["weights"][i].any())
        return (rows if fits else None), longest

    def __call__(self, indexed):
        # (position in the stream, pair): counted once, on the first pass
        position, pair = indexed
        example, n = self.example(pair)
        c, seq = self.counts, self.dcfg.seq_len
        if c["records"] == position < self.num_records:
            c["records"] += 1
            if n > seq:
                c["overlong"] += 1
                c["dropped_tokens"] += n - seq
                if c["overlong"] == 1:
                    log.warning("%s data: a pair has %d tokens > seq_len=%d; truncating (a pair "
                                "cannot be split); the run summary counts them", self.name, n, seq)
            if example is None:
                c["unfit"] += 1
                if c["unfit"] == 1:
                    log.warning("%s data: a prompt fills seq_len=%d, leaving a pair no answer "
                                "token; skipping it (the run summary counts them)", self.name, seq)
        return example

    def report(self) -> str | None:
        c, d = self.counts, self.dcfg
        if not c["overlong"]:
            return None
        done = "" if c["records"] >= self.num_records else " read so far"
        line = (f"{self.name} data: {c['overlong']} of the {c['records']} pairs{done} were "
                f"longer than seq_len={d.seq_len} and were truncated ({c['dropped_tokens']} "
                "tokens dropped per pass)")
        if c["unfit"]:
            line += f"; {c['unfit']} kept no answer token and were skipped"
        return line


class PairLoader(GrainLoader):
    """Infinite iterator of this host's pairs of each global batch: numpy arrays
    ``inputs, targets, weights, segment_ids, positions`` of shape [local_batch, 2, seq_len]
    (the interface of :class:`train.data.Loader`)."""

    def __init__(self, pairs: list[Pair], tokenizer, eos_id: int, dcfg: DataSection,
                 local_batch: int, shuffle: bool | None = None, name: str = "train",
                 source: str = "data"):
        self.builder = PairBuilder(tokenizer, eos_id, dcfg, len(pairs), name)
        if not any(self.builder.example(p)[0] is not None for p in pairs):  # stops at the first
            raise UserError(f"{source}: no pair has an answer token within data.seq_len="
                            f"{dcfg.seq_len}: every prompt fills the row; raise data.seq_len")
        ds = grain.MapDataset.source(pairs)
        if dcfg.shuffle if shuffle is None else shuffle:
            ds = ds.shuffle(seed=dcfg.seed)
        ds = ds.repeat().map_with_index(lambda i, r: (i, r)).to_iter_dataset()
        ds = ds.map(self.builder).filter(lambda x: x is not None)
        self._iter = iter(ds.batch(local_batch, drop_remainder=True))

    def __next__(self) -> dict:
        b = next(self._iter)
        return {k: np.asarray(v) for k, v in b.items()}

