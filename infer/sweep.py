"""Resumable JSONL sweeps: requests in, one result line per request out.

Results are appended batch by batch (flush + fsync), so a kill loses at most the batch
in flight. A rerun of the same command drops a torn last line, skips every id already
in the output, and never writes an id twice. An exclusive lock on the output file
keeps two runs from appending to it at once. On a multi-host run every process reads
the output (all must agree on what is left to do: they run the same batches) and only
process 0 writes it.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax

from meditron_jax.errors import UserError
from meditron_jax.jsonl import JsonlAppender, drop_torn_tail, read_jsonl


def id_key(value: Any) -> str:
    """Ids compare by their JSON text: 7 and "7" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def id_seed(value: Any) -> int:
    """A stable 32-bit seed from an id: a row's samples do not depend on its batch or
    on which ids an interrupted run had already finished."""
    return int.from_bytes(hashlib.sha256(id_key(value).encode()).digest()[:4], "little")


def check_id(record: dict, where: str) -> Any:
    if "id" not in record:
        raise UserError(f"{where}: missing \"id\"; give every line a unique string or integer id")
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise UserError(f"{where}: \"id\" must be a non-empty string or an integer, "
                        f"got {json.dumps(value)}")
    return value


def read_requests(path: str, parse: Callable[[dict, str], Any]) -> list:
    """Every line of ``path`` through ``parse(record, "FILE:LINE")``, after checking ids
    are present and unique. All lines are checked before anything runs."""
    items, first_seen = [], {}
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        key = id_key(check_id(record, where))
        if key in first_seen:
            raise UserError(f"{where}: duplicate id {key} (first on line {first_seen[key]}); "
                            "ids must be unique")
        first_seen[key] = line_no
        items.append(parse(record, where))
    if not items:
        raise UserError(f"{path}: no requests (the file is empty)")
    return items


class ResumableOutput:
    """The append-only output of a sweep and the set of ids it already holds.
    ``writer=None`` means "this is process 0"; a non-writer only reads."""

    def __init__(self, path: str, writer: bool | None = None):
        self.path = path
        self._appender = None
        if writer if writer is not None else jax.process_index() == 0:
            self._appender = JsonlAppender(path)
            try:
                fcntl.flock(self._appender.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._appender.close()
                raise UserError(f"{path}: another run is writing this file; wait for it or "
                                "choose another --out") from None
            drop_torn_tail(path)
        self.done: set[str] = set()
        lines = read_jsonl(path, skip_torn_tail=True) if os.path.exists(path) else []
        for line_no, record in lines:
            key = id_key(check_id(record, f"{path}:{line_no} (existing output)"))
            if key in self.done:
                raise UserError(f"{path}:{line_no}: id {key} appears twice in the existing "
                                "output; this file was not written by a single sweep")
            self.done.add(key)

    def write(self, records: Sequence[dict]) -> None:
        keys = [id_key(r["id"]) for r in records]
        again = [k for k in keys if k in self.done]
        if again or len(set(keys)) != len(keys):
            raise RuntimeError(f"refusing to write ids twice: {again or keys}")
        if self._appender is not None:
            self._appender.write(records)
        self.done.update(keys)

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()

    def __enter__(self) -> "ResumableOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class SweepStats:
    total: int = 0      # requests in the input
    skipped: int = 0    # already in the output
    done: int = 0       # processed by this run
    tokens: int = 0     # what ``process`` counted (generated or scored tokens)
    seconds: float = 0.0

    def summary(self, items: str = "prompts", unit: str = "tokens") -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"{items}={self.done} skipped={self.skipped} total={self.total} "
                f"{unit}={self.tokens} time={self.seconds:.2f}s {unit}/s={rate:.1f}")


Process = Callable[[list], tuple[list[dict], int]]


def run_sweep(items: Sequence, *, key: Callable[[Any], Any], batch_size: int,
              process: Process, out: ResumableOutput | None,
              emit: Callable[[Iterable[dict]], None] | None = None) -> SweepStats:
    """Run ``process(batch) -> (result records, token count)`` over the items whose id
    is not in ``out`` yet, appending each batch's records to ``out`` (or handing them to
    ``emit`` when there is no output file)."""
    pending = [it for it in items if out is None or id_key(key(it)) not in out.done]
    stats = SweepStats(total=len(items), skipped=len(items) - len(pending))
    start = time.perf_counter()
    for i in range(0, len(pending), batch_size):
        records, tokens = process(list(pending[i:i + batch_size]))
        if out is not None:
            out.write(records)
        if emit is not None:
            emit(records)
        stats.done += len(records)
        stats.tokens += tokens
    stats.seconds = time.perf_counter() - start
    return stats
