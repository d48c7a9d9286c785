"""How much memory this process may use: the machine's RAM, or its container's limit when that is lower.

Used to refuse a model that cannot fit before building it: a width that needs more than the machine has would
otherwise fill the memory while the weights are initialised and end in the kernel's out-of-memory kill (of
this process or of another one), not in an error.
"""
from __future__ import annotations

import logging
import os

CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v2, v1
# One worker process (a district's synthesis or training) at the demo's size peaks at about 150 MiB (measured:
# interpreter, NumPy, h5py, a width-6 W-Net and its batch); counted with headroom. A larger model needs more,
# which each worker's own memory check refuses in one line.
WORKER_BYTES = 256 * 2 ** 20

log = logging.getLogger(__name__)


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


def worker_count(requested: int, units: int, *, option: str = "--jobs", per_worker: int = WORKER_BYTES,
                 say: bool = True) -> int:
    """Worker processes to start for `units` districts when `requested`: at most one per district (more would
    only idle) and as many as this machine's memory holds at `per_worker` bytes each; at least one. With `say`, a
    request that was cut is said in one line on stderr (a warning)."""
    have = memory_limit_bytes()
    fits = max(1, have // per_worker) if have else requested
    count = max(1, min(requested, units, fits))
    if say and count < requested:
        if count == max(units, 1):
            why = f"only {units} district" + ("" if units == 1 else "s")
        else:
            why = f"the memory holds {fits} at {gib(per_worker)} each"
        log.warning("%s %d: %d worker process%s (%s)", option, requested, count, "" if count == 1 else "es", why)
    return count
