"""Training data: documents, prompt/completion records or conversations -> packed rows.

The pipeline is grain's (``MapDataset -> shuffle -> repeat -> flat_map -> first-fit
pack -> batch``) because its iterators are checkpointable: ``get_state()`` is a small
JSON dict saved with every checkpoint, so a resumed run sees exactly the batches the
uninterrupted run would have seen. Order depends only on ``data.seed`` (a different
shuffle each epoch).

- Every file is read and validated before training starts (an error names the file
  and line), and each host keeps only its share of the records (record ``i`` goes to
  host ``i % process_count``), so a host loads only its part of the global batch.
- An example is ``inputs = ids[:-1]``, ``targets = ids[1:]`` and ``weights`` (1 where
  the target is trained on: every token of a document; only completion tokens of an
  SFT record; only the assistant turns of a conversation). An example longer than
  ``seq_len`` is split into ``seq_len`` pieces or truncated (``data.overlong``); both are
  counted over one pass and reported. A record left with nothing to train on (an SFT
  prompt that fills ``seq_len`` under truncation) is skipped; when every record is, the
  loader refuses to start (it would cycle forever).
- Conversations (``data.kind: chat``, ``{"messages": [{"role", "content"}, ...]}``) are
  rendered with a chat template (see :func:`chat_template_for`) and encoded when the
  loader is built, so a template that fails on a record stops the run before training,
  naming the file and line. Ids and loss mask are ``ChatTemplate.assistant_mask``'s:
  transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``, or for
  a template without ``{% generation %}`` blocks (Llama-3.1's) what the model writes
  after the generation prompt: each answer and its end-of-turn token.
- First-fit packing never cuts an example across rows, so every segment starts at
  position 0 as it does at inference; segment id 0 marks padding (weight 0).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import grain
import grain.experimental as gx
import numpy as np

from meditron_jax.errors import UserError
from meditron_jax.jsonl import read_json_file, read_jsonl
from meditron_jax.tokenizer.chat import ChatTemplate, check_messages
from train.config import DataSection

log = logging.getLogger("meditron_jax.train")
DOC_SEPARATOR = "---"


# ---- reading and validating records ----------------------------------------------------
def _text_documents(path: str) -> list[str]:
    """A .txt file: documents separated by lines holding only ``---``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    docs, current = [], []
    for line in text.splitlines():
        if line.strip() == DOC_SEPARATOR:
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [d.strip() for d in docs if d.strip()]


def _records_of(path: str, dcfg: DataSection) -> list:
    if not os.path.isfile(path):
        raise UserError(f"{path}: data file not found")
    if not path.endswith((".jsonl", ".json")):
        if dcfg.kind == "sft":
            raise UserError(f"{path}: SFT data must be JSONL with 'prompt' and 'completion'")
        if dcfg.kind == "chat":
            raise UserError(f'{path}: chat data must be JSONL with "messages" on every line')
        return _text_documents(path)
    out = []
    for line_no, rec in read_jsonl(path):
        if dcfg.kind == "chat":
            out.append(_conversation(rec, f"{path}:{line_no}"))
        elif dcfg.kind == "sft":
            for key in ("prompt", "completion"):
                if not isinstance(rec.get(key), str):
                    what = "has no" if key not in rec else "has a non-string"
                    raise UserError(f"{path}:{line_no}: SFT record {what} {key!r}; every line "
                                    'needs {"prompt": "...", "completion": "..."}')
            if not rec["completion"].strip():
                raise UserError(f"{path}:{line_no}: SFT record has an empty 'completion'")
            out.append((rec["prompt"], rec["completion"]))
        else:
            text = rec.get(dcfg.text_key)
            if not isinstance(text, str):
                raise UserError(f"{path}:{line_no}: record has no string field "
                                f"{dcfg.text_key!r} (set data.text_key)")
            if text.strip():
                out.append(text)
    return out


def _conversation(rec: dict, where: str) -> tuple[list, str]:
    """A chat record's messages, checked (roles, non-empty turns, an answer to train
    on), and ``file:line`` for errors found when the template renders it."""
    if "messages" not in rec:
        raise UserError(f'{where}: chat record has no "messages"; every line needs '
                        '{"messages": [{"role": "user", "content": "..."}, ...]}')
    check_messages(rec["messages"], where)
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise UserError(f"{where}: conversation has no assistant message, nothing to train "
                        "on; end it with the answer to learn")
    return rec["messages"], where


def read_records(files, dcfg: DataSection, process_index: int = 0,
                 process_count: int = 1) -> list:
    """Validate every file completely; return this host's share of the records."""
    if not files:
        raise UserError("run config: data.train_files is empty; list text or JSONL files")
    records = []
    for path in files:
        records.extend(_records_of(os.fspath(path), dcfg))
    if not records:
        what = "documents" if dcfg.kind == "pretrain" else "records"
        raise UserError(f"{', '.join(map(str, files))}: no {what} (the corpus is empty)")
    if len(records) < process_count:
        raise UserError(f"{len(records)} records cannot be shared by {process_count} hosts")
    return records[process_index::process_count]


# ---- chat templates ------------------------------------------------------------------------
def chat_template_for(dcfg: DataSection, tokenizer, tokenizer_dir: str | None = None
                      ) -> ChatTemplate:
    """The template ``data.kind: chat`` (and preference pairs given as messages) render with: ``data.chat_template`` (a .jinja
    file, given the tokenizer's bos/eos tokens, or a tokenizer directory), else that of
    ``tokenizer_dir`` (the run's tokenizer) or of ``data.tokenizer`` when a directory."""
    spec = dcfg.chat_template
    if spec and os.path.isdir(spec):
        return _template_of_dir(spec, dcfg.kind)
    if spec:
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"data.chat_template {spec}: cannot read it "
                            f"({getattr(exc, 'strerror', None) or exc}); give a .jinja file "
                            "or a tokenizer directory") from None
        tokens = _special_token_strings(tokenizer) if tokenizer is not None else {}
        return ChatTemplate(text, tokens, source=spec)
    if tokenizer_dir is None and dcfg.tokenizer and os.path.isdir(dcfg.tokenizer):
        tokenizer_dir = dcfg.tokenizer
    if tokenizer_dir is None:
        raise UserError(f"data.kind {dcfg.kind}: no chat template; set data.chat_template to "
                        "a .jinja file or a tokenizer directory that has one")
    return _template_of_dir(tokenizer_dir, dcfg.kind)


def _template_of_dir(path: str, kind: str = "chat") -> ChatTemplate:
    if not (os.path.isfile(os.path.join(path, "chat_template.jinja"))
            or os.path.isdir(os.path.join(path, "chat_templates"))
            or _json_object(os.path.join(path, "tokenizer_config.json")).get("chat_template")):
        raise UserError(f"{path} has no chat template (a base model); for data.kind {kind} set "
                        "data.chat_template to a .jinja file or an instruct model's tokenizer "
                        "directory, or use data.kind sft with prompt/completion records")
    return ChatTemplate.from_dir(path)


def _json_object(path: str) -> dict:
    value = read_json_file(path, {})
    return value if isinstance(value, dict) else {}


def _special_token_strings(tokenizer) -> dict[str, str]:
    """``bos_token``/``eos_token`` for a template read from a file, as the tokenizer has them."""
    out = {}
    for name, token_id in (("bos_token", tokenizer.bos_id),
                           ("eos_token", (tokenizer.eos_ids or (None,))[0])):
        if token_id is not None:
            out[name] = tokenizer.decode([token_id], skip_special_tokens=False)
    return out


def encode_conversations(records: list, tokenizer, template: ChatTemplate) -> list:
    """``(messages, "file:line")`` records -> ``(ids, assistant mask)`` arrays."""
    out = []
    for messages, where in records:
        ids, mask = template.assistant_mask(tokenizer, messages, where=where)
        if not any(mask):
            raise UserError(f"{where}: the chat template of {template.source} leaves no "
                            "assistant token to train on in this conversation")
        out.append((np.asarray(ids, np.int32), np.asarray(mask, np.int8)))
    return out


# ---- tokenizing into examples --------------------------------------------------------------
class ExampleBuilder(gx.FlatMapTransform):
    """Record -> one or more examples ``{"inputs", "targets", "weights"}`` of <= seq_len.

    ``counts`` describes one pass over the ``num_records`` records (the first; later
    epochs see the same records again): how many were read, longer than seq_len, and
    left with nothing to train on (an SFT prompt, or the turns before a conversation's
    first answer, that fills seq_len under truncation). Chat records come encoded.
    """

    def __init__(self, tokenizer, eos_id: int, dcfg: DataSection, num_records: int,
                 name: str = "train"):
        self.tokenizer, self.eos_id, self.dcfg, self.name = tokenizer, eos_id, dcfg, name
        self.num_records = num_records
        self.counts = {"records": 0, "overlong": 0, "dropped_tokens": 0, "unfit": 0}

    def ids_and_weights(self, record) -> tuple[list[int], list[float]]:
        enc = self.tokenizer.encode
        if self.dcfg.kind == "chat":
            return record  # (ids, mask) from encode_conversations
        if self.dcfg.kind == "sft":
            prompt, completion = record
            p = enc(prompt, add_bos=True)
            c = enc(completion, add_bos=False) + [self.eos_id]
            return p + c, [0.0] * len(p) + [1.0] * len(c)
        ids = enc(record, add_bos=True) + [self.eos_id]
        return ids, [1.0] * len(ids)

    def examples(self, record) -> tuple[list[dict], int]:
        """The record's examples, and its length in input tokens."""
        ids, w = self.ids_and_weights(record)
        ids, w = np.asarray(ids, np.int32), np.asarray(w, np.float32)
        # weight of a target token = weight of that token in the record
        inputs, targets, weights = ids[:-1], ids[1:], w[1:]
        n, seq = len(inputs), self.dcfg.seq_len
        if n > seq and self.dcfg.overlong == "truncate":
            inputs, targets, weights = inputs[:seq], targets[:seq], weights[:seq]
        pieces = []
        for s in range(0, len(inputs), seq):
            piece = {"inputs": inputs[s:s + seq], "targets": targets[s:s + seq],
                     "weights": weights[s:s + seq]}
            if piece["weights"].any():  # a piece holding only prompt trains nothing
                pieces.append(piece)
        return pieces, n

    def flat_map(self, indexed):
        # (position in the stream, record): a record that a restored iterator reads again
        # (grain replays the packing batch in progress) is not counted again
        position, record = indexed
        pieces, n = self.examples(record)
        c, seq = self.counts, self.dcfg.seq_len
        if c["records"] == position < self.num_records:  # the first pass
            c["records"] += 1
            if n > seq:
                c["overlong"] += 1
                if self.dcfg.overlong == "truncate":
                    c["dropped_tokens"] += n - seq
            c["unfit"] += not pieces
            if n > seq and c["overlong"] == 1:
                log.warning("%s data: an example has %d tokens > seq_len=%d; %s (data.overlong); "
                            "the run summary counts them", self.name, n, seq,
                            "splitting" if self.dcfg.overlong == "split" else "truncating")
            if not pieces and c["unfit"] == 1:
                log.warning("%s data: %s seq_len=%d, leaving its record nothing to "
                            "train on; skipping it (and others like it: the run summary counts "
                            "them)", self.name, self._prompt_fills, seq)
        return pieces

    def report(self) -> str | None:
        """One line on the overlong records of a pass; None when there were none."""
        c, d = self.counts, self.dcfg
        if not c["overlong"]:
            return None
        done = "" if c["records"] >= self.num_records else " read so far"
        line = (f"{self.name} data: {c['overlong']} of the {c['records']} records{done} were "
                f"longer than seq_len={d.seq_len} and were "
                f"{'split' if d.overlong == 'split' else 'truncated'}")
        if c["dropped_tokens"]:
            line += f" ({c['dropped_tokens']} tokens dropped per pass)"
        if c["unfit"]:
            line += (f"; {c['unfit']} of them kept nothing to train on ({self._prompt_fills} "
                     "seq_len) and were skipped")
        return line

    @property
    def _prompt_fills(self) -> str:
        return ("the turns before the first answer fill" if self.dcfg.kind == "chat"
                else "the prompt fills")


# ---- the loader ------------------------------------------------------------------------
class GrainLoader:
    """What every loader shares: a grain iterator (``_iter``) over a builder's examples
    (``builder``, which counts what it kept, split, truncated or skipped), and the state a
    checkpoint saves (grain's position and those counts)."""

    def __iter__(self) -> Iterator[dict]:
        return self

    @property
    def counts(self) -> dict:
        return dict(self.builder.counts)

    def report(self) -> str | None:
        return self.builder.report()

    def get_state(self) -> dict:
        return {"grain": self._iter.get_state(), "counts": self.counts}

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state["grain"])
        counts = self.builder.counts
        counts.update({k: v for k, v in state.get("counts", {}).items() if k in counts})


class Loader(GrainLoader):
    """Infinite iterator of this host's rows of each global batch, as numpy arrays
    ``inputs, targets, weights, segment_ids, positions`` of shape [local_batch, seq_len].

    ``source`` (the files the records came from) names them in errors. Conversations
    are rendered with ``chat_template``, by default :func:`chat_template_for`'s.
    """

    def __init__(self, records: list, tokenizer, eos_id: int, dcfg: DataSection,
                 local_batch: int, shuffle: bool | None = None, name: str = "train",
                 source: str = "data", chat_template: ChatTemplate | None = None):
        if dcfg.kind == "chat":
            template = chat_template or chat_template_for(dcfg, tokenizer)
            records = encode_conversations(records, tokenizer, template)
            log.info("%s data: %d conversations rendered with the chat template of %s",
                     name, len(records), template.source)
        self.builder = ExampleBuilder(tokenizer, eos_id, dcfg, len(records), name)
        _check_something_fits(self.builder, records, source)
        ds = grain.MapDataset.source(records)
        if dcfg.shuffle if shuffle is None else shuffle:
            ds = ds.shuffle(seed=dcfg.seed)
        ds = ds.repeat().map_with_index(lambda i, r: (i, r)).to_iter_dataset()
        ds = gx.FlatMapIterDataset(ds, self.builder)
        seq = dcfg.seq_len
        ds = gx.FirstFitPackIterDataset(
            ds, length_struct={"inputs": seq, "targets": seq, "weights": seq},
            num_packing_bins=max(dcfg.packing_bins, local_batch), shuffle_bins=False)
        self._iter = iter(ds.batch(local_batch, drop_remainder=True))

    def __next__(self) -> dict:
        b = next(self._iter)
        return {"inputs": b["inputs"].astype(np.int32), "targets": b["targets"].astype(np.int32),
                "weights": b["weights"].astype(np.float32),
                "segment_ids": b["inputs_segment_ids"].astype(np.int32),
                "positions": b["inputs_positions"].astype(np.int32)}



def _check_something_fits(builder: ExampleBuilder, records: list, source: str) -> None:
    """The loader repeats its records forever: if none of them gives an example it would
    spin without ever yielding a batch. Stops at the first record that gives one (the
    first, unless the data are all unusable), so it costs one record's tokenization."""
    if any(builder.examples(r)[0] for r in records):
        return
    d = builder.dcfg
    prompts = [int(np.argmax(np.asarray(builder.ids_and_weights(r)[1]) > 0))  # leading 0s
               for r in records]
    raise UserError(f"{source}: no record has anything to train on within data.seq_len="
                    f"{d.seq_len} with data.overlong={d.overlong}: every prompt fills the row "
                    f"(longest prompt {max(prompts)} tokens, shortest {min(prompts)}); raise "
                    "data.seq_len above the prompts' length or set data.overlong=split")


def fixed_batches(loader: Loader, n: int) -> list[dict]:
    """The first ``n`` batches (a held-out eval set that is the same at every eval)."""
    return [next(loader) for _ in range(n)]
