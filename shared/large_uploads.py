"""How many large uploads this process has in flight, against the cores it may use.

An upload past its hashing threshold counts as large. While there are fewer of them than
cores, a core is to spare, and an upload may give its SHA-256 a thread of its own
(``shared.hashed_body``, ``shared.background_hash``); with an upload on every core, each
does all its work on its own thread, where the data is in cache (bench/README.md, Findings
36).
"""

from __future__ import annotations

import math
import os
import threading

_CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cores(cgroup_cpu_max: str = _CGROUP_CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit shows there, not in the affinity, which lists the node's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    try:
        with open(cgroup_cpu_max) as limits:
            quota, period = limits.read().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 limit to read: the affinity stands
    return max(1, cores)


class LargeUploads:
    """How many uploads of this process are past the threshold, and whether a core is free
    for a hashing thread."""

    def __init__(self, cores: int | None = None) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._cores = cores  # found on first use when not given

    def enter(self) -> None:
        with self._lock:
            if self._cores is None:
                self._cores = usable_cores()
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1

    @property
    def in_flight(self) -> int:
        return self._count

    def core_to_spare(self) -> bool:
        """True while each large upload can have a core and a thread of its own can have
        another (read without the lock: a stale answer costs one piece's placement)."""
        return self._cores is not None and self._count < self._cores


LARGE_UPLOADS = LargeUploads()
