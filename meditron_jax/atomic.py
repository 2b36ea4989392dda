"""Write aside, then rename: a file or directory is either the old one or the complete
new one, never half-written, whatever kills the writer.

``atomic_file`` writes ``PATH.tmp-PID`` and ``os.replace``-s it over ``PATH``.
``staged_dir`` builds a directory in ``.NAME.partial`` next to the destination and
swaps it in at the end: with Linux ``renameat2(RENAME_EXCHANGE)`` the swap is one
atomic step; elsewhere the old directory is first renamed to ``.NAME.old``, and the next
writer puts it back if a crash fell between the two renames. The staging name is
fixed, not per-process, so every host of a multi-host save agrees on it; it also means
one writer per destination at a time.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from typing import IO, Callable, Iterator


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _aside(dest: str, suffix: str) -> str:
    parent, name = os.path.split(os.path.abspath(dest))
    return os.path.join(parent, f".{name}.{suffix}")


def recover(dest: str | os.PathLike) -> None:
    """Undo a swap that a crash cut between its two renames (non-Linux fallback)."""
    dest = os.fspath(dest)
    old = _aside(dest, "old")
    if os.path.isdir(old):
        if os.path.lexists(dest):
            shutil.rmtree(old)
        else:
            os.rename(old, dest)


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, *, lead: bool = True,
               barrier: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield an empty staging directory; on a clean exit it replaces ``dest``.

    On any error (or a kill) ``dest`` is untouched; the staging directory is removed on
    error, and a leftover from a killed run is cleared by the next call. In a
    multi-process save every process passes the same ``dest``; only ``lead`` touches
    the directories, and ``barrier(name)`` keeps the others in step.
    """
    dest = os.path.abspath(os.fspath(dest))
    staging = _aside(dest, "partial")
    if lead:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        recover(dest)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    if barrier:
        barrier(f"staged_dir:start:{dest}")
    try:
        yield staging
        if barrier:
            barrier(f"staged_dir:written:{dest}")
        if lead:
            replace_dir(staging, dest)
    except BaseException:
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if barrier:
        barrier(f"staged_dir:done:{dest}")


def replace_dir(src: str, dest: str) -> None:
    """Move the complete directory ``src`` to ``dest``, replacing what is there."""
    if not os.path.lexists(dest):
        os.rename(src, dest)
    elif _exchange(src, dest):
        shutil.rmtree(src)  # now the old directory
    else:
        old = _aside(dest, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(src, dest)
        shutil.rmtree(old)
    _fsync_dir(os.path.dirname(dest))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
