"""The workloads (document size, clients, steps) and their measurement: each step's figures,
and a workload's sustained and peak rates."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import MongoClient

from bench import documents
from bench.harness import Harness, Tracked
from bench.load import Client, Upload, run_step
from bench.procs import MIB
from bench.report import figure
from bench.stats import latency_summary

KIB = 1024


@dataclass(frozen=True)
class Step:
    kind: str  # "probe" (closed loop), "step" (fraction of the probe's rate), "half"
    count: int
    fraction: float | None = None  # of the probe's rate (step) or the sustained (half)


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    concurrency: int
    steps: tuple[Step, ...]
    floor_sequential: int
    floor_concurrent: int

    @property
    def total(self) -> int:
        return sum(s.count for s in self.steps)


def plans(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("small", 64 * KIB, 16, (
                Step("probe", 40), Step("step", 40, 0.5), Step("step", 40, 1.0),
                Step("step", 40, 1.5), Step("half", 40, 0.5)), 50, 100),
            Workload("medium", 2 * MIB, 8, (
                Step("probe", 5), Step("step", 4, 0.5), Step("step", 4, 1.0),
                Step("step", 4, 1.5), Step("half", 3, 0.5)), 10, 20),
            Workload("large", 50 * MIB, 2, (Step("probe", 1),), 1, 2),
        ]
    return [
        Workload("small", 64 * KIB, 16, (
            Step("probe", 200), Step("step", 280, 0.25), Step("step", 280, 0.5),
            Step("step", 280, 0.75), Step("step", 280, 1.0), Step("step", 280, 1.5),
            Step("half", 400, 0.5)), 200, 400),
        Workload("medium", 2 * MIB, 8, (
            Step("probe", 40), Step("step", 30, 0.5), Step("step", 30, 0.75),
            Step("step", 30, 1.0), Step("step", 30, 1.5), Step("half", 40, 0.5)), 20, 40),
        Workload("large", 200 * MIB, 2, (
            Step("probe", 1), Step("step", 2, 0.5), Step("step", 2, 2.0)), 5, 6),
    ]


def rate_of(count: int, start: float, end: float) -> float | None:
    return count / (end - start) if count and end > start else None


def mongo_ops(mongo: MongoClient[Any]) -> dict[str, float] | None:
    """The server's operation counters by kind (insert, query, update, delete, getmore,
    command)."""
    try:
        counters = mongo.admin.command("serverStatus").get("opcounters", {})
    except Exception:
        return None
    return {k: float(v) for k, v in counters.items() if isinstance(v, int | float)}


def measure_step(h: Harness, client: Client, tracked: Tracked, mongo: MongoClient[Any],
                 database: str, wl: Workload, step: Step, rate: float | None) -> dict[str, Any]:
    count = step.count
    note = None
    if rate and count / rate > h.step_seconds:
        count = max(int(rate * h.step_seconds), 10)
        note = f"count cut from {step.count} to {count} to keep the step under " \
               f"{h.step_seconds:.0f} s"
    first = h.indices(count)
    try:
        before: int | None = mongo[database]["documents"].estimated_document_count()
    except Exception:
        before = None
    cpu0 = tracked.cpu()
    sys0 = tracked.system()
    ops0 = mongo_ops(mongo)
    t_start = time.time()
    concurrency = wl.concurrency
    uploads = run_step(client, wl.name, wl.size, count, rate, concurrency, first)
    accepted = [u for u in uploads if u.accepted]
    ids = [u.doc_id for u in accepted if u.doc_id]
    expected = (count / rate if rate else 0) + wl.size / MIB * count / 10 + 30
    drained = h.receipts.wait_for(ids, min(max(expected, 60.0), 900.0))
    cpu1 = tracked.cpu()
    sys1 = tracked.system()
    t_end = time.time()
    ops1 = mongo_ops(mongo)
    records = {}
    for start in range(0, len(ids), 500):
        for rec in mongo[database]["documents"].find(
                {"_id": {"$in": ids[start:start + 500]}},
                {"status": 1, "updated_at": 1, "created_at": 1, "reason": 1}):
            records[rec["_id"]] = rec
    result = summarize_step(h, wl, step, rate, uploads, records, cpu0, cpu1, drained, note)
    result["window"] = [t_start, t_end]
    result["cpu_sys_s_per_doc"] = {k: (v - sys0.get(k, 0.0)) / max(result["accepted"], 1)
                                   for k, v in sys1.items()}
    result["documents_in_db_before"] = before
    if ops0 is not None and ops1 is not None:
        docs = max(result["accepted"], 1)
        # The serverStatus command of the second reading counts itself.
        by_kind = {k: v - ops0.get(k, 0.0) for k, v in ops1.items()}
        by_kind["command"] = by_kind.get("command", 0.0) - 1
        result["mongo_ops_per_doc"] = sum(by_kind.values()) / docs
        result["mongo_ops_per_doc_by_kind"] = {k: round(v / docs, 2)
                                               for k, v in by_kind.items() if v}
    return result


def _ts(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp() if value.tzinfo is None else value.timestamp()


def summarize_step(h: Harness, wl: Workload, step: Step, rate: float | None,
                   uploads: list[Upload], records: dict[str, Any], cpu0: dict[str, float],
                   cpu1: dict[str, float], drained: bool, note: str | None) -> dict[str, Any]:
    size_mib = documents.document_size(wl.size) / MIB
    accepted = [u for u in uploads if u.accepted]
    start = min((u.started for u in uploads if u.started), default=0.0)
    accept_end = max((u.started + (u.accept_seconds or 0) for u in accepted), default=0.0)
    stored_lat: list[float] = []
    push_lat: list[float] = []
    stored_end = 0.0
    push_end = 0.0
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for u in accepted:
        rec = records.get(u.doc_id or "")
        status = str(rec.get("status")) if rec else "missing"
        statuses[status] += 1
        if rec and status == "stored":
            done = _ts(rec["updated_at"])
            stored_lat.append(done - u.started)
            stored_end = max(stored_end, done)
        elif rec and rec.get("reason"):
            reasons[str(rec["reason"])[:200]] += 1
        receipt = h.receipts.times.get(u.doc_id or "")
        if receipt:
            push_lat.append(receipt[0] - u.started)
            push_end = max(push_end, receipt[0])
    n_stored = statuses.get("stored", 0)
    errors = Counter((u.error or "")[:120] for u in uploads if not u.accepted)
    cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    n = max(len(accepted), 1)
    app_cpu = sum(v for k, v in cpu.items() if k.startswith(("serve", "worker")))
    result: dict[str, Any] = {
        "kind": step.kind,
        "fraction": step.fraction,
        "count": len(uploads),
        "offered_docs_per_s": rate,
        "offered_mib_per_s": rate * size_mib if rate else None,
        "accepted": len(accepted),
        "stored": n_stored,
        "pushed": len(push_lat),
        "drained": drained,
        "statuses": dict(statuses),
        "reasons": dict(reasons),
        "errors": dict(errors),
        "accepted_docs_per_s": rate_of(len(accepted), start, accept_end),
        "stored_docs_per_s": rate_of(n_stored, start, stored_end),
        "pushed_docs_per_s": rate_of(len(push_lat), start, push_end),
        "latency_ms": {
            "accept": latency_summary([u.accept_seconds or 0 for u in accepted]),
            "stored": latency_summary(stored_lat),
            "push": latency_summary(push_lat),
            "client_lag": latency_summary([u.lag for u in uploads if u.started and rate]),
        },
        "cpu_s": cpu,
        "cpu_s_per_doc": {"app": app_cpu / n, **{k: v / n for k, v in cpu.items()}},
    }
    for key in ("accepted", "stored", "pushed"):
        value = result[f"{key}_docs_per_s"]
        result[f"{key}_mib_per_s"] = value * size_mib if value else None
    if note:
        result["note"] = note
    # Per upload: [seconds since the step's first byte, 202 ms, stored ms, push ms].
    samples: list[list[float | None]] = []
    for u in accepted:
        rec = records.get(u.doc_id or "")
        receipt = h.receipts.times.get(u.doc_id or "")
        stored_ms = (_ts(rec["updated_at"]) - u.started) * 1000 \
            if rec and rec.get("status") == "stored" else None
        samples.append([round(u.started - start, 3), round((u.accept_seconds or 0) * 1000, 1),
                        None if stored_ms is None else round(stored_ms, 1),
                        round((receipt[0] - u.started) * 1000, 1) if receipt else None])
    result["samples"] = samples
    for u in uploads:
        if u.error and len(h.problems) < 200:
            h.problems.append(f"{wl.name}: upload {u.index}: {u.error}")
    return result


def run_workload(h: Harness, client: Client, tracked: Tracked, mongo: MongoClient[Any],
                 database: str, wl: Workload) -> dict[str, Any]:
    tracked.reset_peaks()
    cpu0 = tracked.cpu()
    steps: list[dict[str, Any]] = []
    probe_rate: float | None = None
    docs = 0
    for step in wl.steps:
        if time.monotonic() > h.deadline:
            h.problems.append(f"{wl.name}: time budget spent, {step.kind} step skipped")
            continue
        if step.kind == "probe":
            rate = None
        elif step.kind == "step":
            if not probe_rate:
                continue
            rate = probe_rate * (step.fraction or 1.0)
        else:
            best = sustained(steps) or peak(steps)
            if not best:
                continue
            rate = best["docs_per_s"] * (step.fraction or 0.5)
        result = measure_step(h, client, tracked, mongo, database, wl, step, rate)
        docs += result["accepted"]
        steps.append(result)
        if step.kind == "probe":
            # The burst's accepted rate, when higher: a pipeline whose stored rate in a
            # closed-loop burst was held back by the clients' own latency would otherwise
            # never be offered more than it can take, and its sustained rate would read low.
            probe_rate = max(result["stored_docs_per_s"] or 0.0,
                             result["accepted_docs_per_s"] or 0.0) or None
        lat = result["latency_ms"]
        print(f"  {wl.name:6} {step.kind:5} offered "
              f"{figure(rate, '{:.2f}/s') if rate else 'closed loop':>11}  "
              f"accepted {figure(result['accepted_docs_per_s'], '{:.2f}/s'):>9} "
              f"stored {figure(result['stored_docs_per_s'], '{:.2f}/s'):>9}  "
              f"p99 202 {figure(lat['accept']['p99'], '{:.0f}ms')} "
              f"stored {figure(lat['stored']['p99'], '{:.0f}ms')} "
              f"push {figure(lat['push']['p99'], '{:.0f}ms')}  "
              f"{result['stored']}/{result['count']} stored", flush=True)
    cpu1 = tracked.cpu()
    cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    n = max(docs, 1)
    app_cpu = sum(v for k, v in cpu.items() if k.startswith(("serve", "worker")))
    half = next((s for s in steps if s["kind"] == "half"), None)
    return {
        "size": documents.document_size(wl.size),
        "concurrency": wl.concurrency,
        "documents": docs,
        "steps": steps,
        "sustained": sustained(steps) or peak(steps),
        "peak": peak(steps),
        "half": half,
        "cpu_s_per_doc": {"app": app_cpu / n, **{k: v / n for k, v in cpu.items()}},
        "peak_rss_mib": tracked.peaks(),
    }


def sustained(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The stored rate the pipeline keeps up under open-loop load: over the open-loop steps,
    the highest min(offered rate, stored rate). A step offered more than the pipeline can
    take drains its backlog at capacity, so its stored rate is that capacity; a step below
    capacity counts for its offered rate. The closed-loop probe (a burst) does not count."""
    best: dict[str, Any] | None = None
    for index, step in enumerate(steps):
        offered = step.get("offered_docs_per_s")
        stored = step.get("stored_docs_per_s")
        if not offered or not stored or step["stored"] < step["accepted"]:
            continue
        rate = min(offered, stored)
        if best is None or rate > best["docs_per_s"]:
            size_mib = step["stored_mib_per_s"] / stored
            best = {"docs_per_s": rate, "mib_per_s": rate * size_mib, "step": index,
                    "kind": step["kind"], "offered_docs_per_s": offered,
                    "stored_docs_per_s": stored}
    return best


def peak(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest stored rate of any step, the closed-loop probe included."""
    best: dict[str, Any] | None = None
    for index, step in enumerate(steps):
        rate = step.get("stored_docs_per_s")
        if rate and (best is None or rate > best["docs_per_s"]):
            best = {"docs_per_s": rate, "mib_per_s": step["stored_mib_per_s"], "step": index,
                    "kind": step["kind"]}
    return best
