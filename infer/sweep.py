"""Resumable JSONL sweeps: requests in, one result line per request out.

Results are appended batch by batch (flush + fsync), so a kill loses at most the batch
in flight (:func:`run_sweep`), or the results not yet written (:func:`run_streaming_sweep`:
written in input order as they finish). A rerun of the same command drops a torn last
line, skips every id already in the output, and never writes an id twice. An exclusive
lock on the output file keeps two runs from appending to it at once. On a multi-host run every process reads
the output (all must agree on what is left to do: they run the same batches: a shared
file system is checked, not assumed) and only process 0 writes it.

What produced the results (model fingerprint, sampling, ...: everything but how the
run is laid out) is recorded beside them in ``OUT.settings.json`` before the first
record; a rerun under other settings is refused, naming what differs, instead of
skipping every id and serving the old results (``overwrite`` starts over).
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
import numpy as np

from meditron_jax.atomic import write_json
from meditron_jax.errors import UserError
from meditron_jax.jsonl import JsonlAppender, drop_torn_tail, read_json_file, read_jsonl

SETTINGS_SUFFIX = ".settings.json"


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


def check_settings(path: str, settings: dict, *, label: str, hint: str, has_results: bool,
                   write: bool) -> None:
    """Refuse to add to results made under other settings than ``settings`` (a one-line
    error naming the keys that differ), or under unrecorded ones; otherwise record
    ``settings`` in ``path`` (atomically, when ``write``: process 0). ``label`` names the
    results, ``hint`` says what to do instead."""
    settings = json.loads(json.dumps(settings))      # compare as the file will hold them
    previous = read_json_file(path)
    if previous == settings:
        return
    if has_results:
        if not isinstance(previous, dict):
            raise UserError(f"{label} holds results but no record of the settings that made "
                            f"them (no {os.path.basename(path)}); {hint}")
        changed = sorted(k for k in set(previous) | set(settings)
                         if previous.get(k) != settings.get(k))
        raise UserError(f"{label} holds results of a run with other settings "
                        f"({', '.join(changed)} differ); {hint}")
    if write:
        write_json(path, settings)


class ResumableOutput:
    """The append-only output of a sweep and the set of ids it already holds.
    ``writer=None`` means "this is process 0"; a non-writer only reads. With
    ``settings``, results of other settings are refused (see :func:`check_settings`);
    ``overwrite`` removes the old results and their settings first."""

    def __init__(self, path: str, writer: bool | None = None, *, settings: dict | None = None,
                 overwrite: bool = False):
        self.path = path
        self.settings_path = path + SETTINGS_SUFFIX
        self._appender = None
        self.done: set[str] = set()
        writer = jax.process_index() == 0 if writer is None else writer
        error = None
        try:
            self._open(writer, settings, overwrite)
        except UserError as exc:
            error = exc
        except OSError as exc:   # read-only location, a file in the way, ...
            error = UserError(f"{path}: cannot write there ({exc.strerror}); give a "
                              "writable --out")
        error = _processes_disagree(path, self.done, failed=error is not None) or error
        if error is not None:
            self.close()
            raise error

    def _open(self, writer: bool, settings: dict | None, overwrite: bool) -> None:
        path = self.path
        if os.path.isdir(path):
            raise UserError(f"{path}: is a directory; --out takes a JSONL file path")
        if writer:
            self._appender = JsonlAppender(path)
            try:
                fcntl.flock(self._appender.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"{path}: another run is writing this file; wait for it or "
                                "choose another --out") from None
            if overwrite:
                # Settings first: a kill in between leaves results without settings, refused.
                if os.path.exists(self.settings_path):
                    os.remove(self.settings_path)
                os.ftruncate(self._appender.fileno(), 0)
                os.fsync(self._appender.fileno())
        if not overwrite and os.path.exists(path):   # (process 0 may be truncating it)
            for line_no, record in read_jsonl(path, skip_torn_tail=True):
                key = id_key(check_id(record, f"{path}:{line_no} (existing output)"))
                if key in self.done:
                    raise UserError(f"{path}:{line_no}: id {key} appears twice in the existing "
                                    "output; this file was not written by a single sweep")
                self.done.add(key)
        if settings is not None:
            check_settings(self.settings_path, settings, label=path, has_results=bool(self.done),
                           write=writer, hint="pass --overwrite to start over, or give another "
                                              "--out")
        if writer:
            drop_torn_tail(path)

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


def _processes_disagree(path: str, done: set[str], failed: bool) -> UserError | None:
    """Multi-host: every process must have opened the output and see the same done ids,
    or they would run different batches and wait on each other forever. A process that
    ``failed`` keeps its own error; the others get one here instead of a hang."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils
    digest = hashlib.sha256("\n".join(sorted(done)).encode()).digest()
    mine = np.frombuffer(bytes([not failed]) + digest, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    if failed:
        return None
    if not every[:, 0].all():
        return UserError(f"{path}: another process could not open this output (see its error)")
    if (every != mine).any():
        return UserError(f"{path}: the processes see different results in it; --out must be "
                         "on a file system that every process shares")
    return None


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


def run_streaming_sweep(items: Sequence, *, key: Callable[[Any], Any], flush_every: int,
                        run: Callable[[list, Callable[[int, dict, int], None]], None],
                        out: ResumableOutput | None,
                        emit: Callable[[Iterable[dict]], None] | None = None) -> SweepStats:
    """Like :func:`run_sweep` for a runner that finishes items one at a time, in any
    order: ``run(pending, done)`` calls ``done(i, record, token count)`` once per item
    ``pending[i]`` as it finishes. Records are written (or emitted) in input order, as
    soon as ``flush_every`` of them are ready with none missing before them, so a
    resumed sweep writes the file an uninterrupted one writes."""
    pending = [it for it in items if out is None or id_key(key(it)) not in out.done]
    stats = SweepStats(total=len(items), skipped=len(items) - len(pending))
    ready: dict[int, dict] = {}
    written = 0

    def flush(minimum: int):
        nonlocal written
        end = written
        while end in ready:
            end += 1
        if end - written < minimum or end == written:
            return
        records = [ready.pop(i) for i in range(written, end)]
        if out is not None:
            out.write(records)
        if emit is not None:
            emit(records)
        stats.done += len(records)
        written = end

    def done(i: int, record: dict, tokens: int):
        ready[i] = record
        stats.tokens += tokens
        flush(flush_every)

    start = time.perf_counter()
    if pending:
        run(list(pending), done)
    flush(1)
    if ready:
        raise RuntimeError(f"{len(ready)} results were never written (some items not done)")
    stats.seconds = time.perf_counter() - start
    return stats
