"""What one run carries through its parts: where it runs, the FCM stub's receipts of the
pushes, the processes it measures, and its settings and problems."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.procs import MIB

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
HELPER_SAMPLE = 0.05


class Receipts:
    """Tails the FCM stub's receipts file: document id -> (arrival time, status)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.times: dict[str, tuple[float, str]] = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                self.times.setdefault(str(rec["doc"]), (float(rec["t"]), str(rec["status"])))

    def wait_for(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if all(i in self.times for i in ids):
                return True
            time.sleep(0.2)
        self.poll()
        return all(i in self.times for i in ids)


@dataclass
class Tracked:
    """The processes whose CPU and memory are reported, by role.

    A docproc process's helpers (the processes it starts that are not tracked themselves:
    the forkserver and the children inspecting large PDFs and TIFFs) are counted with it
    for CPU. Their memory is reported apart, as ``<role> helpers``: the most any one of
    them held, sampled every ``HELPER_SAMPLE`` seconds (a child is gone by the end of the
    workload, and its high-water mark with it)."""

    app: dict[str, int] = field(default_factory=dict)  # docproc processes
    infra: dict[str, int] = field(default_factory=dict)  # services and the FCM stub
    helper_peaks: dict[str, int] = field(default_factory=dict)
    _sampling: threading.Event = field(default_factory=threading.Event)
    _peaks_lock: threading.Lock = field(default_factory=threading.Lock)

    def helpers(self, pid: int) -> list[int]:
        tracked = set(self.app.values())
        out: list[int] = []
        todo = [c for c in procs.children(pid) if c not in tracked]
        while todo and len(out) < 64:
            current = todo.pop()
            out.append(current)
            todo += [c for c in procs.children(current) if c not in tracked and c not in out]
        return out

    def cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, pid in {**self.app, **self.infra}.items():
            times = procs.cpu_times(pid)
            out[role] = times.total if times else 0.0
            if role in self.app:
                # A helper's reaped children are in its own children's times.
                out[role] += sum(t.total for h in self.helpers(pid)
                                 if (t := procs.cpu_times(h)) is not None)
        times = procs.cpu_times(os.getpid())
        out["client"] = times.total if times else 0.0
        return out

    def system(self) -> dict[str, float]:
        """The kernel's share of ``cpu()``: copies into the page cache, writeback, sockets."""
        out: dict[str, float] = {}
        for role, pid in self.app.items():
            times = procs.cpu_times(pid)
            out[role] = times.system + times.children_system if times else 0.0
            out[role] += sum(t.system + t.children_system for h in self.helpers(pid)
                             if (t := procs.cpu_times(h)) is not None)
        return out

    def start_sampling(self) -> None:
        def sample() -> None:
            while not self._sampling.wait(HELPER_SAMPLE):
                # Under the lock, so a reset between a read and its update cannot carry a
                # peak from before the workload into it.
                with self._peaks_lock:
                    for role, pid in list(self.app.items()):
                        for helper in self.helpers(pid):
                            peak = procs.peak_rss(helper) or 0
                            if peak > self.helper_peaks.get(role, 0):
                                self.helper_peaks[role] = peak

        self._sampling.clear()
        threading.Thread(target=sample, daemon=True, name="helper-peaks").start()

    def stop_sampling(self) -> None:
        self._sampling.set()

    def reset_peaks(self) -> None:
        for pid in self.app.values():
            procs.reset_peak(pid)
        for role, pid in self.infra.items():
            if role == "secantusd":
                procs.reset_peak(pid)
        with self._peaks_lock:
            for pid in self.app.values():
                for helper in self.helpers(pid):
                    procs.reset_peak(helper)
            self.helper_peaks.clear()

    def peaks(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for role, pid in self.app.items():
            peak = procs.peak_rss(pid)
            out[role] = round(peak / MIB, 1) if peak else None
        for role, helper_peak in self.helper_peaks.items():
            out[f"{role} helpers"] = round(helper_peak / MIB, 1)
        if "secantusd" in self.infra:
            peak = procs.peak_rss(self.infra["secantusd"])
            out["secantusd"] = round(peak / MIB, 1) if peak else None
        return out


@dataclass
class Harness:
    run_id: str
    work: Path
    fcm_dir: Path
    fcm_pid: int
    receipts: Receipts
    deadline: float
    step_seconds: float
    retry_writes: bool = False
    replica_set: bool = False
    quick: bool = False
    settings: dict[str, str] = field(default_factory=dict)  # --set: DOCPROC_* for docproc
    fresh_connections: bool = False  # --fresh-connections: one HTTP connection per upload
    problems: list[str] = field(default_factory=list)
    next_index: int = 0

    def indices(self, count: int) -> int:
        first = self.next_index
        self.next_index += count
        return first
