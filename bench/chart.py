"""``bench/results/latest*.png``: throughput and latency against the offered rate, and CPU per
document against the documents already stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import documents
from bench.procs import MIB
from bench.report import Floor


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("small", "medium", "large")
             if any(n in m.get("workloads", {}) for m in result["modes"].values())]
    fig, axes = plt.subplots(len(names) + 1, 2, figsize=(13, 4 * (len(names) + 1)),
                             squeeze=False)
    colors = {"embedded": "tab:blue", "services": "tab:orange"}
    for row, name in enumerate(names):
        ax_t, ax_l = axes[row]
        # The floor the services mode's targets use (beside its workload, when measured).
        floor = Floor(result, "services", name)
        fdocs = floor.best("docs_per_s")
        for mode, mres in result["modes"].items():
            wl = mres.get("workloads", {}).get(name)
            if not wl:
                continue
            pts = sorted(((s["offered_docs_per_s"], s) for s in wl["steps"]
                          if s["kind"] == "step"), key=lambda p: p[0])
            xs = [p[0] for p in pts]
            color = colors.get(mode, "gray")
            ax_t.plot(xs, [p[1]["stored_docs_per_s"] or 0 for p in pts], "o-", color=color,
                      label=f"{mode} stored")
            ax_t.plot(xs, [p[1]["accepted_docs_per_s"] or 0 for p in pts], "x--",
                      color=color, alpha=0.6, label=f"{mode} accepted (202)")
            for key, style in (("accept", ":"), ("stored", "-"), ("push", "--")):
                ys = [p[1]["latency_ms"][key]["p99"] for p in pts]
                ax_l.plot(xs, [y if y is not None else float("nan") for y in ys],
                          style, marker="o", color=color, label=f"{mode} {key} p99")
            ys = [p[1]["latency_ms"]["stored"]["p50"] for p in pts]
            ax_l.plot(xs, [y if y is not None else float("nan") for y in ys], "-",
                      marker=".", color=color, alpha=0.4, label=f"{mode} stored p50")
            for s in wl["steps"]:
                if s["kind"] == "half" and s["offered_docs_per_s"]:
                    x = s["offered_docs_per_s"]
                    ax_t.plot([x], [s["stored_docs_per_s"] or 0], "*", ms=12, color=color,
                              label=f"{mode} half-sustained step")
                    for key in ("accept", "stored"):
                        y = s["latency_ms"][key]["p99"]
                        if y is not None:
                            ax_l.plot([x], [y], "*", ms=12, color=color,
                                      label=f"{mode} half-sustained {key} p99")
                elif s["kind"] == "probe" and s["accepted_docs_per_s"]:
                    # Closed loop: no offered rate; drawn at the rate it was accepted.
                    x = s["accepted_docs_per_s"]
                    ax_t.plot([x], [s["stored_docs_per_s"] or 0], "D", color=color,
                              mfc="none", label=f"{mode} closed-loop probe (x = 202 rate)")
                    y = s["latency_ms"]["stored"]["p99"]
                    if y is not None:
                        ax_l.plot([x], [y], "D", color=color, mfc="none",
                                  label=f"{mode} probe stored p99")
        if xs_all := [s["offered_docs_per_s"] or s["accepted_docs_per_s"] or 0
                      for m in result["modes"].values()
                      for s in m.get("workloads", {}).get(name, {}).get("steps", [])]:
            top = max(xs_all)
            ax_t.plot([0, top], [0, top], color="gray", lw=0.8, alpha=0.5,
                      label="offered = achieved")
        if fdocs:
            ax_t.axhline(fdocs, color="green", ls="--", lw=1,
                         label=f"floor (best), {floor.where}")
            ax_t.axhline(fdocs / 2, color="green", ls=":", lw=1, label="50% of floor")
        size = documents.document_size(result["config"][name]["size"]) / MIB
        ax_t.set_title(f"{name} ({size:.2f} MiB): throughput vs offered rate")
        ax_t.set_xlabel("offered documents/s")
        ax_t.set_ylabel("documents/s")
        ax_t.legend(fontsize=6)
        ax_t.grid(alpha=0.3)
        ax_l.set_title(f"{name}: latency vs offered rate")
        ax_l.set_xlabel("offered documents/s")
        ax_l.set_ylabel("ms (log)")
        ax_l.set_yscale("log")
        if name == "small":
            ax_l.axhline(250, color="red", ls=":", lw=1, label="250 ms target (stored p99)")
            ax_l.axhline(50, color="purple", ls=":", lw=1, label="50 ms target (202 p99)")
        ax_l.legend(fontsize=6)
        ax_l.grid(alpha=0.3)
    # Last row: CPU per small/medium document against the documents already stored.
    for col, name in enumerate(("small", "medium")):
        ax = axes[len(names)][col]
        for mode, mres in result["modes"].items():
            wl = mres.get("workloads", {}).get(name)
            if not wl:
                continue
            pts = sorted(((s.get("documents_in_db_before") or 0, s) for s in wl["steps"]),
                         key=lambda p: p[0])
            color = colors.get(mode, "gray")
            ax.plot([p[0] for p in pts], [p[1]["cpu_s_per_doc"].get("app", 0) * 1000
                                          for p in pts], "o-", color=color,
                    label=f"{mode}: docproc processes")
            if any("secantusd" in p[1]["cpu_s_per_doc"] for p in pts):
                ax.plot([p[0] for p in pts],
                        [p[1]["cpu_s_per_doc"].get("secantusd", 0) * 1000 for p in pts], "s--",
                        color=color, label=f"{mode}: SecantusDB server")
        ax.set_title(f"{name}: CPU ms per document vs documents already in the database")
        ax.set_xlabel("documents in the collection at the step's start")
        ax.set_ylabel("CPU ms / document")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"docproc bench {result['started']} "
                 f"({result['machine']['cpu_count']} CPUs{', quick' if result['quick'] else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
