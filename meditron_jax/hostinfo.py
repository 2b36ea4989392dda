"""Facts about the host, read without importing JAX (the benchmark's parent process
records them too), and the allocator setting the command-line entry points start with."""
from __future__ import annotations

import functools
import os
import sys


@functools.cache
def cpuinfo_field(name: str) -> str:
    """The first ``name : value`` of /proc/cpuinfo ("vendor_id", "model name"), "" when
    the field or the file is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


# ---- huge pages for the allocator ------------------------------------------------------------
# XLA:CPU allocates an executable's temporaries afresh on every call, through glibc's
# malloc; buffers above 32 MiB are new mmaps, so each train step or forward page-faults
# every 4 KiB of its working set again (64,000 faults for one [2048, 32000] float32
# buffer). With this tunable glibc asks for transparent huge pages (madvise): 637 faults
# for that buffer, and the `small` train step 5.6 -> 4.05 s, `medium` 47.2 -> 40.3 s, same
# peak RSS (bench/NOTES.md). glibc reads it only as a process starts, hence the re-exec.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGEPAGES_ENV = "MEDITRON_HUGEPAGES"   # "0": leave the process's allocator alone
_REEXEC_MARK = "_MEDITRON_REEXECED"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_ENABLED) -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), "" when
    unknown (not Linux, or no THP)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def hugepage_tunables(env, thp: str, glibc: tuple[int, int] | None) -> str | None:
    """The GLIBC_TUNABLES value this process should start with, or None to leave it as
    it is: opted out, already set (by us or by the user), THP not in "madvise" mode
    ("always" needs no advice, "never" takes none), or a C library without the tunable
    (glibc < 2.35, musl)."""
    current = env.get("GLIBC_TUNABLES", "")
    if (env.get(HUGEPAGES_ENV) == "0" or env.get(_REEXEC_MARK) or thp != "madvise"
            or glibc is None or glibc < (2, 35) or "glibc.malloc.hugetlb" in current):
        return None
    return f"{current}:{HUGEPAGE_TUNABLE}" if current else HUGEPAGE_TUNABLE


def reexec_with_hugepages() -> None:
    """Restart this command (same interpreter, same arguments) with
    :data:`HUGEPAGE_TUNABLE` when :func:`hugepage_tunables` asks for it. Called first
    thing by the command-line entry points, before JAX or PyTorch load; library users
    export ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` themselves. If the exec fails the
    command runs on unchanged."""
    tunables = hugepage_tunables(os.environ, thp_mode(), glibc_version())
    if tunables is None or not sys.orig_argv or not sys.executable:
        return
    env = {**os.environ, "GLIBC_TUNABLES": tunables, _REEXEC_MARK: "1"}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return
