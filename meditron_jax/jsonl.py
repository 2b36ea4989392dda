"""JSON Lines in and out: errors that name the file and the line, durable appends.

Readers (prompts, score requests, fine-tuning records) all go through
:func:`read_jsonl`, so a bad line is reported the same way everywhere. Writers that
must survive a kill (resumable sweeps) append whole lines with :class:`JsonlAppender`
and repair a torn last line with :func:`drop_torn_tail` before resuming.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

from meditron_jax.errors import UserError


def iter_jsonl(path: str | os.PathLike, *,
               skip_torn_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for every non-blank line (1-based numbers);
    with ``skip_torn_tail``, an unterminated last line is ignored (see drop_torn_tail)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; give a JSONL file (one JSON object per line)")
    with open(path, encoding="utf-8") as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{line_no + 1}: not UTF-8 text; save the file as "
                                "UTF-8 JSONL") from None
            if not line or (skip_torn_tail and not line.endswith("\n")):
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_no}: malformed JSON ({exc.msg}, column "
                                f"{exc.colno}); fix or remove that line") from None


def read_jsonl(path: str | os.PathLike, *,
               skip_torn_tail: bool = False) -> list[tuple[int, dict]]:
    """All lines of ``path`` as ``(line_number, object)``; every line must be an object."""
    out = []
    for line_no, value in iter_jsonl(path, skip_torn_tail=skip_torn_tail):
        if not isinstance(value, dict):
            raise UserError(f"{os.fspath(path)}:{line_no}: expected a JSON object "
                            f"({{...}}), got {type(value).__name__}")
        out.append((line_no, value))
    return out


def drop_torn_tail(path: str | os.PathLike) -> int:
    """Cut an unterminated last line (a write interrupted by a kill); return bytes cut.

    Every line is written with its newline in one append, so a last line without one
    is incomplete by construction, even if it happens to parse.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the previous newline in blocks.
        end, block = size, 1 << 16
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


class JsonlAppender:
    """Append records to a JSONL file durably: each :meth:`write` call ends with
    flush + fsync, so a batch that was reported written survives a kill or power cut."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise UserError(f"{self.path}: directory {parent} does not exist; create it first")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_json_file(path: str | os.PathLike, default=None):
    """A whole JSON file, or ``default`` when it does not exist; malformed JSON is a
    one-line error naming the file and line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
