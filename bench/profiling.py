"""The py-spy pass: the services-mode server profiled under small documents, and the samples
summed up by function and by library/module."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import BIN, RESULTS, ROOT, Harness, Tracked
from bench.load import Client, run_step
from bench.workloads import KIB


def run_profile(h: Harness, client: Client, tracked: Tracked, mode_result: dict[str, Any],
                spec: dict[str, Any]) -> dict[str, Any]:
    """py-spy on the gunicorn worker (the process doing the work) under small documents.

    Two samplers run side by side (non-blocking, so they can share the process): one takes
    every thread that is not idle, the other (``--gil``) only the thread holding the GIL,
    i.e. where the process's one Python CPU goes."""
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    worker = next((pid for role, pid in tracked.app.items() if role.startswith("serve-worker")),
                  None)
    if worker is None:
        return {"error": "no gunicorn worker process found"}
    small = mode_result["workloads"].get("small", {})
    best = (small.get("sustained") or {}).get("docs_per_s") or 10.0
    rate = best * spec["fraction"]
    # About 20 s of load (8 s with --quick), within bounds.
    count = int(min(max(rate * (8 if h.quick else 20), 60 if h.quick else 150),
                    150 if h.quick else 600))
    duration = int(count / rate + 4)
    outputs = {"active": h.work / "profile-active.txt", "gil": h.work / "profile-gil.txt"}
    targets_ = {"active": worker, "gil": worker}
    for role, pid in tracked.app.items():
        if role.startswith("worker-"):
            # The event functions' own processes (services mode with --workers).
            outputs[f"{role}-gil"] = h.work / f"profile-{role}-gil.txt"
            targets_[f"{role}-gil"] = pid
    if tracked.infra.get("secantusd"):
        # The MongoDB wire server is a Python process too: where its CPU goes.
        outputs["secantusd-gil"] = h.work / "profile-secantusd-gil.txt"
        targets_["secantusd-gil"] = tracked.infra["secantusd"]
    spies = {}
    for kind, path in outputs.items():
        extra = ["--gil"] if kind.endswith("gil") else []
        spies[kind] = subprocess.Popen(
            [str(pyspy), "record", "--pid", str(targets_[kind]), "--rate", "200",
             "--nonblocking",
             "--format", "raw", "--output", str(path), "--duration", str(duration), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    cpu0 = tracked.cpu()
    t0 = time.monotonic()
    first = h.indices(count)
    uploads = run_step(client, "profile", 64 * KIB, count, rate, 16, first)
    ids = [u.doc_id for u in uploads if u.doc_id]
    h.receipts.wait_for(ids, 120)
    wall = time.monotonic() - t0
    cpu1 = tracked.cpu()
    result: dict[str, Any] = {
        "pid": worker, "rate_docs_per_s": rate, "documents": count,
        "window": [time.time() - wall, time.time()],
        "worker_cpu_utilisation": sum(cpu1[k] - cpu0[k] for k in cpu1
                                      if k.startswith("serve-worker")) / wall,
        "cpu_utilisation": {k: (cpu1[k] - cpu0[k]) / wall for k in cpu1},
    }
    for kind, spy in spies.items():
        try:
            _, err = spy.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        path = outputs[kind]
        if not path.exists():
            result[kind] = {"error": f"py-spy wrote nothing: "
                                     f"{err.decode(errors='replace')[-500:]}"}
            continue
        summary = summarize_profile(path.read_text(errors="replace"))
        keep = RESULTS / f"{spec['out']}-{kind}.txt"
        shutil.copyfile(path, keep)
        summary["raw"] = str(keep.relative_to(ROOT))
        result[kind] = summary
    return result


PROJECT = ("docproc/", "shared/", "events/", "functions/")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(text: str) -> tuple[str, str]:
    match = FRAME.match(text.strip())
    if not match:
        return text.strip(), ""
    return match["func"], match["file"]


def _area(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[0].removesuffix(".py")
    parts = Path(path.removesuffix(".py")).parts
    for project in ("docproc", "shared", "events", "functions", "bench", "tests"):
        if project in parts:
            i = parts.index(project)
            return "/".join(parts[i:i + 2]).removesuffix(".py")
    return parts[0] if parts else "?"


def summarize_profile(text: str, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares by function, and self shares by library/module."""
    total = 0
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    area_counts: Counter[str] = Counter()
    area_incl: Counter[str] = Counter()
    project_incl: Counter[str] = Counter()
    for n, line in enumerate(text.splitlines()):
        if n > 5_000_000:
            break
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        func, path = frames[-1]
        self_counts[f"{func} ({_short(path)})"] += count
        area_counts[_area(path)] += count
        for area in {_area(p) for _, p in frames}:
            area_incl[area] += count
        seen: set[str] = set()
        for func, path in frames:
            key = f"{func} ({_short(path)})"
            if key not in seen:
                seen.add(key)
                incl_counts[key] += count
                if _area(path).startswith(PROJECT):
                    project_incl[key] += count
    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "share": v / total if total else 0.0}
                for k, v in c.most_common(top)]

    return {"samples": total, "self": share(self_counts), "inclusive": share(incl_counts),
            "by_area_self": share(area_counts), "by_area_inclusive": share(area_incl),
            "project_inclusive": share(project_incl)}


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path
