"""Facts about the host CPU, read without importing JAX (the benchmark's parent process
records them too)."""
from __future__ import annotations

import functools


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
