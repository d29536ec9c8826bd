"""Reading processes from /proc: CPU time, resident memory and its high-water mark."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


@dataclass(frozen=True)
class CpuTimes:
    user: float
    system: float
    children_user: float
    children_system: float

    @property
    def total(self) -> float:
        """user + sys of the process and of its waited-for children."""
        return self.user + self.system + self.children_user + self.children_system


def cpu_times(pid: int) -> CpuTimes | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17.
    utime, stime, cutime, cstime = (int(v) / TICKS for v in fields[11:15])
    return CpuTimes(utime, stime, cutime, cstime)


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss(pid: int) -> int | None:
    """VmHWM: the most resident memory since start (or since ``reset_peak``), in bytes."""
    return _status_kib(pid, "VmHWM")


def rss(pid: int) -> int | None:
    return _status_kib(pid, "VmRSS")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree(pid: int, limit: int = 64) -> list[int]:
    """``pid`` and its descendants (at most ``limit`` processes)."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < limit:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += children(current)
    return seen


def find_by_name(names: tuple[str, ...], limit: int = 4096) -> dict[str, int]:
    """The first process whose command name (comm) is one of ``names`` (shared services)."""
    found: dict[str, int] = {}
    for count, entry in enumerate(Path("/proc").iterdir()):
        if count > limit or len(found) == len(names):
            break
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names and comm not in found:
            found[comm] = int(entry.name)
    return found
