"""The warnings, errors and tracebacks in the processes' logs: grouped, and counted per step."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import Harness


def log_problems(paths: list[Path], limit: int = 25) -> dict[str, Any]:
    """WARNING/ERROR/CRITICAL lines and tracebacks in the processes' logs, grouped."""
    pattern = re.compile(r" (WARNING|ERROR|CRITICAL) ")
    groups: Counter[str] = Counter()
    samples: dict[str, str] = {}
    tracebacks = 0
    for path in paths:
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines()):
            if n > 2_000_000:
                break
            if line.startswith("Traceback"):
                tracebacks += 1
            match = pattern.search(line)
            if not match:
                continue
            # Group by the message with ids and numbers blanked out.
            text = line[match.start():]
            key = re.sub(r"[0-9a-f]{16,}|\d+(\.\d+)?", "#", text)[:200]
            groups[key] += 1
            samples.setdefault(key, f"{path.name}: {line[:400]}")
    top = groups.most_common(limit)
    return {"lines": sum(groups.values()), "tracebacks": tracebacks,
            "groups": [{"count": c, "example": samples[k]} for k, c in top]}


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (WARNING|ERROR|CRITICAL) ")


def log_events(paths: list[Path], limit: int = 200_000) -> list[tuple[float, str]]:
    """(time, line) of every warning or error in the logs (local-time stamps, as logged)."""
    events: list[tuple[float, str]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines()[:limit]:
            match = LOG_LINE.match(line)
            if match:
                stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append((stamp, f"{path.name}: {line[:300]}"))
    return events


def mark_log_events(h: Harness, mode: str, result: dict[str, Any],
                    events: list[tuple[float, str]]) -> None:
    """Count the warnings/errors logged during each step; name the steps they touched."""
    windows: list[tuple[str, dict[str, Any]]] = [
        (f"{name} {step['kind']} {step['fraction'] or ''}".strip(), step)
        for name, wl in result.get("workloads", {}).items() for step in wl["steps"]]
    if isinstance(result.get("profile"), dict) and "window" in result["profile"]:
        windows.append(("profile pass", result["profile"]))
    for label, step in windows:
        start, end = step["window"]
        inside = [text for t, text in events if start - 0.5 <= t <= end + 0.5]
        step["log_warnings"] = len(inside)
        if inside:
            step["log_first"] = inside[0]
            h.problems.append(f"{mode} {label}: {len(inside)} warning/error log lines during "
                              f"the step; first: {inside[0]}")
