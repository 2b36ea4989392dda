"""Write aside, then rename: a file or directory is either the old one or the complete
new one, never half-written, whatever kills the writer.

``atomic_file`` writes ``PATH.tmp-PID`` and ``os.replace``-s it over ``PATH``.
``staged_dir`` builds a directory in ``.NAME.partial`` next to the destination and
swaps it in at the end: with Linux ``renameat2(RENAME_EXCHANGE)`` the swap is one
atomic step; elsewhere the old directory is first renamed to ``.NAME.old``, and the next
writer puts it back if a crash fell between the two renames. The staging name is
fixed, not per-process, so every host of a multi-host save agrees on it; it also means
one writer per destination at a time, which ``locked`` enforces across processes.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from typing import IO, Callable, Iterator

from meditron_jax.errors import UserError


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
            _remove_settled(staging)
        raise
    if barrier:
        barrier(f"staged_dir:done:{dest}")


def _remove_settled(path: str, settle_s: float = 2.0) -> None:
    """Remove a failed write's staging directory. A failed Orbax save can raise while its
    other writer threads are still finishing (they recreate directories as they write),
    so remove it until it stays gone for 0.3 s (at most ``settle_s`` in all)."""
    deadline, gone = time.monotonic() + settle_s, 0
    while gone < 3 and time.monotonic() < deadline:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.1)
        gone = 0 if os.path.lexists(path) else gone + 1


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


# ---- one writer per destination -----------------------------------------------------------
@contextlib.contextmanager
def locked(dest: str | os.PathLike) -> Iterator[None]:
    """Hold ``dest`` (a file or directory about to be written) for the block: a second
    holder, in any process on any host sharing the file system, gets a UserError at once
    naming the first one's pid and host.

    The lock is ``flock`` on ``.NAME.lock`` beside ``dest``, released by the kernel
    however the holder ends (SIGKILL included), so it is never stale; the file itself is
    removed on release. Missing parent directories are created. Not re-entrant: take it
    once per destination. On a file system without ``flock`` (some Lustre mounts) it
    logs a warning and the block runs unguarded.
    """
    dest = os.path.abspath(os.fspath(dest))
    path = _aside(dest, "lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{dest} is being written by {holder} (lock {path}); wait for it "
                            "to finish or write elsewhere") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            logging.getLogger(__name__).warning(
                "%s: the file system cannot lock (%s); nothing stops a second writer", path,
                exc.strerror)
            break
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file while we opened it: retry
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # still held: no one can take the lock on a removed file
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


# ---- file-system errors as one line -------------------------------------------------------
def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` for an OSError (its file, then its strerror or message)."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
