"""meditron_jax.hostinfo: the allocator's huge pages, decided without JAX and set by
restarting the command (glibc reads GLIBC_TUNABLES only as a process starts)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meditron_jax import hostinfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


@pytest.mark.parametrize("env, thp, glibc, expected", [
    ({}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's
    ({"MEDITRON_HUGEPAGES": "0"}, "madvise", GLIBC, None),                   # opted out
    ({"_MEDITRON_REEXECED": "1"}, "madvise", GLIBC, None),                   # no loop
    ({}, "always", GLIBC, None),      # every large mapping is already huge
    ({}, "never", GLIBC, None),
    ({}, "", GLIBC, None),            # no THP (or not Linux)
    ({}, "madvise", (2, 34), None),   # glibc before the tunable
    ({}, "madvise", None, None),      # not glibc
])
def test_hugepage_tunables_only_where_they_take_effect(env, thp, glibc, expected):
    assert hostinfo.hugepage_tunables(env, thp, glibc) == expected


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostinfo.thp_mode(str(path)) == "madvise"
    assert hostinfo.thp_mode(str(tmp_path / "absent")) == ""


# The child: restart with huge pages, then touch 64 MiB of fresh malloc memory and
# count the page faults it took (16,384 with 4 KiB pages, ~32 with 2 MiB ones).
_CHILD = """
import ctypes, os, resource, sys
sys.path.insert(0, {root!r})
from meditron_jax import hostinfo
hostinfo.reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ptr = libc.malloc(size)
ctypes.memset(ptr, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", "-"), faults)
"""


def _child(**env) -> tuple[str, int]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", hostinfo.HUGEPAGES_ENV, hostinfo._REEXEC_MARK)}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT)], cwd=ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tunables, faults = proc.stdout.split()
    return tunables, int(faults)


# what this host would restart with from a bare environment (None: no THP madvise mode
# or no glibc >= 2.35 here)
HERE = hostinfo.hugepage_tunables({}, hostinfo.thp_mode(), hostinfo.glibc_version())


@pytest.mark.skipif(HERE is None, reason="needs THP in madvise mode and glibc >= 2.35")
def test_the_restarted_process_faults_in_huge_pages():
    tunables, faults = _child()
    assert tunables == "glibc.malloc.hugetlb=1"
    plain_tunables, plain_faults = _child(MEDITRON_HUGEPAGES="0")
    assert plain_tunables == "-" and plain_faults >= 16384
    assert faults * 8 < plain_faults, (faults, plain_faults)
