"""How much memory this process may use: the machine's RAM, or its container's limit when that is lower.

Used to refuse a model that cannot fit before building it: a width that needs more than the machine has would
otherwise fill the memory while the weights are initialised and end in the kernel's out-of-memory kill (of
this process or of another one), not in an error.
"""
from __future__ import annotations

import os

CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v2, v1


def memory_limit_bytes() -> int | None:
    """Bytes of memory this process may use at most (None when unknown)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in CGROUP_LIMITS:
        try:
            with open(path) as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:   # "max" (v2) and v1's huge "unlimited" leave the RAM as the limit
            limits.append(int(text))
    limits = [limit for limit in limits if limit > 0]
    return min(limits) if limits else None


def gib(count: float) -> str:
    """Bytes as GiB for messages (one decimal below 10 GiB)."""
    value = count / 2 ** 30
    return f"{value:.1f} GiB" if value < 10 else f"{value:.0f} GiB"
