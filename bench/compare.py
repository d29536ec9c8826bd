"""``--compare``: a result's headline figures against an earlier result's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.report import figure, floor_best


def flatten(result: dict[str, Any]) -> dict[str, float]:
    """The headline figures, by name, for --compare."""
    out: dict[str, float] = {}
    for name, entry in result.get("floor", {}).items():
        for kind in ("sequential", "concurrent"):
            if kind in entry:
                out[f"floor/{name}/{kind}/docs_per_s"] = entry[kind]["docs_per_s"]
                out[f"floor/{name}/{kind}/mib_per_s"] = entry[kind]["mib_per_s"]
    for mode, mres in result.get("modes", {}).items():
        for name, wl in mres.get("workloads", {}).items():
            p = f"{mode}/{name}"
            for when, entry in (wl.get("floor_beside") or {}).items():
                best = floor_best({name: entry}, name, "docs_per_s")
                if best is not None:
                    out[f"{p}/floor_{when}/docs_per_s"] = best
            sus = wl.get("sustained") or {}
            for key in ("docs_per_s", "mib_per_s"):
                if sus.get(key) is not None:
                    out[f"{p}/sustained/{key}"] = sus[key]
            half = wl.get("half") or {}
            for lat_key, lat in half.get("latency_ms", {}).items():
                if lat_key == "client_lag":
                    continue
                for q in ("p50", "p99"):
                    if lat.get(q) is not None:
                        out[f"{p}/half/{lat_key}/{q}_ms"] = lat[q]
            for key, value in wl.get("cpu_s_per_doc", {}).items():
                if key in ("app", "secantusd", "beam.smp") and value:
                    out[f"{p}/cpu_s_per_doc/{key}"] = value
            for role, value in wl.get("peak_rss_mib", {}).items():
                if value is not None:
                    out[f"{p}/peak_rss_mib/{role}"] = value
    return out


def compare(old_path: Path, new: dict[str, Any]) -> None:
    old = json.loads(old_path.read_text())
    a, b = flatten(old), flatten(new)
    print(f"\n== compared with {old_path} ({old.get('started')}) ==")
    print(f"{'figure':58} {'old':>10} {'new':>10} {'change':>8}")
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        change = f"{(vb - va) / va:+.1%}" if va and vb is not None else ""
        print(f"{key:58} {figure(va, '{:.3f}'):>10} {figure(vb, '{:.3f}'):>10} {change:>8}")
