"""docproc benchmark: the real pipeline over HTTP, its floor, and the issue's targets.

    .venv/bin/python -m bench.run [--quick] [--compare bench/results/<old>.json]

Runs, in one go on this machine: the floor (bench/floor.py), then ``docproc serve`` in two
modes -- ``embedded`` (no AMQP_URL/MONGODB_URI/REDIS_URL: in-process bus, embedded
SecantusDB) and ``services`` (RabbitMQ, Redis and a SecantusDB server process) -- each fed
small, medium and large PDFs by an open-loop client (bench/load.py) at increasing fixed
arrival rates, with pushes going to a loopback FCM stub (bench/fcm_server.py) in both modes.
Then it profiles the services-mode server under small documents with py-spy, prints the
figures with their ratios to the floor and the targets, and writes
``bench/results/latest.json`` (plus a timestamped copy) and ``bench/results/latest.png``.
See bench/README.md for what every figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pika
import redis
import requests
from pymongo import MongoClient

from bench import documents, procs
from bench.load import Client, Upload, run_step
from bench.stats import latency_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
MIB = 1024 * 1024
KIB = 1024
AMQP_URL = os.environ.get("DOCPROC_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("DOCPROC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0)  # the default schedule: topology.delete needs it
USERS = 8
RSS_TARGET_MIB = 150.0


# --------------------------------------------------------------------------- plans


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


# --------------------------------------------------------------------------- helpers


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


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("DOCPROC_", "AMQP_", "MONGODB_", "REDIS_", "FIREBASE_",
                                 "FCM_", "K_SINK", "KMS_"))}


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


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("docproc", "cryptography", "pika", "pymongo", "gunicorn", "werkzeug",
                 "pydantic", "firebase-admin", "SecantusDB", "redis", "requests",
                 "matplotlib", "py-spy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    with contextlib.suppress(Exception):
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        props = conn._impl.server_properties
        out["rabbitmq"] = props.get("version", b"?").decode() if isinstance(
            props.get("version"), bytes) else str(props.get("version"))
        conn.close()
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(REDIS_URL)
        info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
        out["redis-server"] = str(info["redis_version"])
        client.close()
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(), "versions": versions()}


# --------------------------------------------------------------------------- a mode


@dataclass
class Tracked:
    """The processes whose CPU and memory are reported, by role."""

    app: dict[str, int] = field(default_factory=dict)  # docproc processes
    infra: dict[str, int] = field(default_factory=dict)  # services and the FCM stub

    def cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, pid in {**self.app, **self.infra}.items():
            times = procs.cpu_times(pid)
            out[role] = times.total if times else 0.0
        times = procs.cpu_times(os.getpid())
        out["client"] = times.total if times else 0.0
        return out

    def system(self) -> dict[str, float]:
        """The kernel's share of ``cpu()``: copies into the page cache, writeback, sockets."""
        out: dict[str, float] = {}
        for role, pid in self.app.items():
            times = procs.cpu_times(pid)
            out[role] = times.system + times.children_system if times else 0.0
        return out

    def reset_peaks(self) -> None:
        for pid in self.app.values():
            procs.reset_peak(pid)
        for role, pid in self.infra.items():
            if role == "secantusd":
                procs.reset_peak(pid)

    def peaks(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for role, pid in self.app.items():
            peak = procs.peak_rss(pid)
            out[role] = round(peak / MIB, 1) if peak else None
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
    problems: list[str] = field(default_factory=list)
    next_index: int = 0

    def indices(self, count: int) -> int:
        first = self.next_index
        self.next_index += count
        return first


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
              f"{_fmt(rate, '{:.2f}/s') if rate else 'closed loop':>11}  "
              f"accepted {_fmt(result['accepted_docs_per_s'], '{:.2f}/s'):>9} "
              f"stored {_fmt(result['stored_docs_per_s'], '{:.2f}/s'):>9}  "
              f"p99 202 {_fmt(lat['accept']['p99'], '{:.0f}ms')} "
              f"stored {_fmt(lat['stored']['p99'], '{:.0f}ms')} "
              f"push {_fmt(lat['push']['p99'], '{:.0f}ms')}  "
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


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


@contextlib.contextmanager
def mongo_server(h: Harness, name: str) -> Iterator[tuple[str, int]]:
    """A fresh SecantusDB server process; its URI (see ``Harness.retry_writes``) and pid.

    Standalone, as ``mongod`` runs by default and as the embedded default runs it: a server
    advertising a replica set writes an oplog entry for every changed record, which only
    change streams and replication read, and docproc uses neither (bench/README.md,
    Findings 20). ``Harness.replica_set`` keeps the oplog, to compare."""
    storage = h.work / f"secantus-{name}"
    storage.mkdir(parents=True)
    port = free_port()
    log = (h.work / f"secantusd-{name}.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "secantusd-py"), "--host", "127.0.0.1", "--port", str(port),
         "--storage-path", str(storage), "--log-level", "WARNING",
         *([] if h.replica_set else ["--standalone"])],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        import socket

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("secantusd-py exited at start")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        options = "" if h.retry_writes else "?retryWrites=false"
        yield f"mongodb://127.0.0.1:{port}/{options}", proc.pid
    finally:
        stop_process(proc)
        log.close()
        shutil.rmtree(storage, ignore_errors=True)


def run_mode(h: Harness, mode: str, workloads: list[Workload], mongo_uri: str, mongo_pid: int,
             workers: int, profile: dict[str, Any] | None,
             serve_processes: int = 1) -> dict[str, Any]:
    port = free_port()
    data_dir = h.work / f"data-{mode}"
    prefix = f"docproc-bench-{h.run_id}-{mode}"
    database = prefix.replace("-", "_")
    max_size = max(documents.document_size(w.size) for w in workloads)
    env = base_env()
    env.update({
        "DOCPROC_DATA_DIR": str(data_dir),
        "DOCPROC_MAX_UPLOAD_BYTES": str(max_size + MIB),
        "FIREBASE_CREDENTIALS": str(h.fcm_dir / "service-account.json"),
        "FCM_ENDPOINT": (h.fcm_dir / "base_url").read_text().strip(),
        "DOCPROC_PUBLIC_URL": f"http://127.0.0.1:{port}",
    })
    if mode == "services":
        env.update({"AMQP_URL": AMQP_URL, "MONGODB_URI": mongo_uri, "MONGODB_DATABASE": database,
                    "REDIS_URL": REDIS_URL, "DOCPROC_AMQP_PREFIX": prefix,
                    "DOCPROC_REDIS_PREFIX": prefix + ":"})
    env.update(h.settings)
    logs: list[Path] = []
    procs_started: list[subprocess.Popen[bytes]] = []
    # With worker processes, serve answers HTTP only: the deployed shape, where every
    # function is a service of its own.
    split = mode == "services" and workers > 0
    result: dict[str, Any] = {"port": port, "workers": workers if mode == "services" else 0,
                              "serve_processes": serve_processes if split else 1}
    print(f"mode {mode}: docproc serve on 127.0.0.1:{port}", flush=True)
    try:
        serve_log = h.work / f"serve-{mode}.log"
        logs.append(serve_log)
        out = serve_log.open("wb")
        serve_cmd = [str(BIN / "docproc"), "serve", "--port", str(port)] + (
            ["--http-only", "--processes", str(serve_processes)] if split else [])
        serve = subprocess.Popen(serve_cmd, env=env, cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT)
        procs_started.append(serve)
        wait_http(f"http://127.0.0.1:{port}/readyz", serve, 120, serve_log)
        tracked = Tracked()
        tracked.app["serve"] = serve.pid
        for n, child in enumerate(procs.children(serve.pid)):
            tracked.app[f"serve-worker{n or ''}"] = child
        if split:
            for fn in ("storage", "notification"):
                for n in range(workers):
                    wlog = h.work / f"worker-{fn}-{n}.log"
                    logs.append(wlog)
                    wout = wlog.open("wb")
                    proc = subprocess.Popen(
                        [str(BIN / "docproc"), "worker", fn, "--ops-host", "127.0.0.1",
                         "--ops-port", "0"], env=env, cwd=ROOT, stdout=wout,
                        stderr=subprocess.STDOUT)
                    procs_started.append(proc)
                    tracked.app[f"worker-{fn}-{n}"] = proc.pid
            time.sleep(3)
        tracked.infra["fcm-stub"] = h.fcm_pid
        if mode == "services":
            tracked.infra["secantusd"] = mongo_pid
            for name, pid in procs.find_by_name(("beam.smp", "redis-server")).items():
                tracked.infra[name] = pid
        result["processes"] = {role: procs.command(pid)[:160]
                               for role, pid in {**tracked.app, **tracked.infra}.items()}
        result["idle_rss_mib"] = {role: round((procs.rss(pid) or 0) / MIB, 1)
                                  for role, pid in tracked.app.items()}
        result["startup_peak_rss_mib"] = tracked.peaks()
        users = [f"bench-{h.run_id}-{mode}-{n}" for n in range(USERS)]
        for n, user in enumerate(users):
            resp = requests.post(f"http://127.0.0.1:{port}/v1/users/me/devices", timeout=30,
                                 headers={"X-Consumer-Username": user,
                                          "X-Consumer-Groups": "drivers"},
                                 json={"token": f"bench-{h.run_id}-{mode}-device-{n}",
                                       "platform": "android"})
            resp.raise_for_status()
        uri = mongo_uri if mode == "services" else \
            (data_dir / "mongo.uri").read_text().strip()
        db_name = database if mode == "services" else "docproc"
        mongo: MongoClient[Any] = MongoClient(uri)
        client = Client("127.0.0.1", port, users, f"{h.run_id}{mode[0]}")
        result["workloads"] = {}
        try:
            for wl in workloads:
                result["workloads"][wl.name] = run_workload(h, client, tracked, mongo, db_name,
                                                            wl)
            if profile is not None:
                result["profile"] = run_profile(h, client, tracked, result, profile)
        finally:
            mongo.close()
    finally:
        for proc in reversed(procs_started):
            stop_process(proc)
        result["log_problems"] = log_problems(logs)
        mark_log_events(h, mode, result, log_events(logs))
        if mode == "services":
            cleanup_services(prefix, database, mongo_uri, h)
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def cleanup_services(prefix: str, database: str, mongo_uri: str, h: Harness) -> None:
    from events import topology

    try:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            topology.delete(conn.channel(), prefix, RETRY_DELAYS)
        finally:
            conn.close()
    except Exception as exc:
        h.problems.append(f"cleanup: RabbitMQ {prefix}: {exc}")
    try:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + ":*", count=500))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as exc:
        h.problems.append(f"cleanup: Redis {prefix}: {exc}")
    try:
        mc: MongoClient[Any] = MongoClient(mongo_uri)
        mc.drop_database(database)
        mc.close()
    except Exception as exc:
        h.problems.append(f"cleanup: MongoDB {database}: {exc}")


# --------------------------------------------------------------------------- profile


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


# --------------------------------------------------------------------------- report


def ratio(value: float | None, floor: float | None) -> float | None:
    return value / floor if value is not None and floor else None


def floor_best(floor: dict[str, Any], name: str, key: str) -> float | None:
    entry = floor.get(name, {})
    values = [entry[k][key] for k in ("sequential", "concurrent") if k in entry]
    return max(values) if values else None


def floor_latency(floor: dict[str, Any], name: str) -> float | None:
    entry = floor.get(name, {}).get("sequential")
    return entry["latency_ms"]["p50"] if entry else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    floor = result["floor"]
    svc = result["modes"].get("services", {}).get("workloads", {})
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, unit: str) -> None:
        out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                    "met": ok})

    small = svc.get("small", {})
    sus = (small.get("sustained") or {}).get("docs_per_s")
    fl = floor_best(floor, "small", "docs_per_s")
    r = ratio(sus, fl)
    add("small: sustained throughput >= 50% of the floor's", r, 0.5,
        None if r is None else r >= 0.5, "x floor")
    half = small.get("half") or {}
    p99 = (half.get("latency_ms", {}).get("stored") or {}).get("p99")
    add("small: p99 upload->stored < 250 ms at half the sustained rate", p99, 250.0,
        None if p99 is None else p99 < 250.0, "ms")
    p99a = (half.get("latency_ms", {}).get("accept") or {}).get("p99")
    add("small: upload 202 p99 < 50 ms at half the sustained rate", p99a, 50.0,
        None if p99a is None else p99a < 50.0, "ms")
    large = svc.get("large", {})
    lm = (large.get("sustained") or {}).get("mib_per_s")
    lf = floor_best(floor, "large", "mib_per_s")
    r = ratio(lm, lf)
    add("large: MiB/s >= 70% of the floor's", r, 0.7, None if r is None else r >= 0.7,
        "x floor")
    peaks = [v for w in svc.values() for role, v in (w.get("peak_rss_mib") or {}).items()
             if v is not None and role != "secantusd"]
    worst = max(peaks) if peaks else None
    add("peak RSS of every docproc process < 150 MiB", worst, RSS_TARGET_MIB,
        None if worst is None else worst < RSS_TARGET_MIB, "MiB")
    return out


def print_report(result: dict[str, Any]) -> None:
    floor = result["floor"]
    print("\n== floor (bench/floor.py) ==")
    floor_end = result.get("floor_end") or {}
    for name in floor_end:
        start, end = floor_best(floor, name, "docs_per_s"), floor_best(
            floor_end, name, "docs_per_s")
        if start and end:
            print(f"{name} floor at the start {start:.1f} docs/s, at the end {end:.1f} "
                  f"({(end / start - 1) * 100:+.0f}%: the machine's drift during the run; "
                  f"ratios use the start)")
    print(f"{'size':8} {'mode':11} {'docs/s':>8} {'MiB/s':>8} {'p50 ms':>8} {'CPU s/doc':>10}")
    for name, entry in floor.items():
        for kind in ("sequential", "concurrent"):
            if kind in entry:
                e = entry[kind]
                print(f"{name:8} {kind[:4] + ' x' + str(e['concurrency']):11} "
                      f"{e['docs_per_s']:8.1f} {e['mib_per_s']:8.1f} "
                      f"{e['latency_ms']['p50']:8.1f} {e['cpu_s_per_doc']:10.4f}")
        services = entry.get("services_cpu_s_per_doc", {})
        if services:
            print(f"{'':8} services CPU s/doc: " + ", ".join(
                f"{k} {v:.4f}" for k, v in services.items()))
    for mode, mres in result["modes"].items():
        print(f"\n== {mode} ==  (ratios: throughput / floor's best, latency / floor's "
              f"sequential p50, CPU / floor's; '!': warnings were logged during the step)")
        for name, wl in mres.get("workloads", {}).items():
            fdocs = floor_best(floor, name, "docs_per_s")
            flat = floor_latency(floor, name)
            fcpu = floor.get(name, {}).get("sequential", {}).get("cpu_s_per_doc")
            print(f"-- {name} ({wl['size'] / MIB:.2f} MiB, {wl['concurrency']} clients)")
            print(f"   {'step':13} {'offered':>8} {'acc/s':>7} {'stored/s':>9} {'MiB/s':>7}"
                  f" {'x fl':>5} | {'202 p50/p90/p99/max ms':>24} | "
                  f"{'stored p50/p90/p99/max ms':>26} | {'push p50/p99 ms':>16} | lag p99 |"
                  f" in DB | CPU s/doc app+db")
            for s in wl["steps"]:
                lat = s["latency_ms"]
                label = s["kind"] + (f" {s['fraction']:g}" if s["fraction"] else "")

                def q(d: dict[str, float | None], keys: tuple[str, ...]) -> str:
                    return "/".join(_fmt(d.get(k), "{:.0f}") for k in keys)

                if s.get("log_warnings"):
                    label += " !"
                print(f"   {label:13} {_fmt(s['offered_docs_per_s'], '{:.2f}'):>8} "
                      f"{_fmt(s['accepted_docs_per_s'], '{:.2f}'):>7} "
                      f"{_fmt(s['stored_docs_per_s'], '{:.2f}'):>9} "
                      f"{_fmt(s['stored_mib_per_s'], '{:.1f}'):>7} "
                      f"{_fmt(ratio(s['stored_docs_per_s'], fdocs), '{:.2f}'):>5} | "
                      f"{q(lat['accept'], ('p50', 'p90', 'p99', 'max')):>24} | "
                      f"{q(lat['stored'], ('p50', 'p90', 'p99', 'max')):>26} | "
                      f"{q(lat['push'], ('p50', 'p99')):>16} | "
                      f"{_fmt(lat['client_lag']['p99'], '{:.0f}'):>7} | "
                      f"{s.get('documents_in_db_before') or 0:5d} | "
                      f"{s['cpu_s_per_doc'].get('app', 0):.3f}"
                      f"+{s['cpu_s_per_doc'].get('secantusd', 0):.3f}")
            sus = wl.get("sustained") or {}
            half = wl.get("half") or {}
            hl = half.get("latency_ms", {})
            print(f"   sustained {_fmt(sus.get('docs_per_s'), '{:.2f}')} docs/s "
                  f"{_fmt(sus.get('mib_per_s'), '{:.1f}')} MiB/s = "
                  f"{_fmt(ratio(sus.get('docs_per_s'), fdocs), '{:.2f}')} x floor")
            if hl:
                print(f"   at half rate: p50 stored "
                      f"{_fmt(hl['stored']['p50'], '{:.0f}')} ms = "
                      f"{_fmt(ratio(hl['stored']['p50'], flat), '{:.1f}')} x floor latency; "
                      f"p99 stored {_fmt(hl['stored']['p99'], '{:.0f}')} ms; "
                      f"p99 202 {_fmt(hl['accept']['p99'], '{:.0f}')} ms; "
                      f"p99 push {_fmt(hl['push']['p99'], '{:.0f}')} ms")
            cpu = wl["cpu_s_per_doc"]
            fdb = floor.get(name, {}).get("services_cpu_s_per_doc", {}).get("secantusd")
            db_ratio = "" if "secantusd" not in cpu else \
                f", secantusd = {_fmt(ratio(cpu.get('secantusd'), fdb), '{:.1f}')} x floor's"
            print("   CPU s/doc: " + ", ".join(f"{k} {v:.4f}" for k, v in cpu.items() if v)
                  + f"  (app = {_fmt(ratio(cpu.get('app'), fcpu), '{:.1f}')} x floor"
                  + db_ratio + ")")
            ops = [st["mongo_ops_per_doc"] for st in wl["steps"] if "mongo_ops_per_doc" in st]
            if ops:
                kinds: dict[str, list[float]] = {}
                for st in wl["steps"]:
                    for k, v in st.get("mongo_ops_per_doc_by_kind", {}).items():
                        kinds.setdefault(k, []).append(v)
                split = ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in kinds.items())
                print(f"   MongoDB operations per document: {sum(ops) / len(ops):.1f} "
                      f"({split}; the floor: 2)")
            print("   peak RSS MiB: " + ", ".join(f"{k} {v}" for k, v in
                                                  wl["peak_rss_mib"].items()))
        lp = mres.get("log_problems", {})
        if lp.get("lines") or lp.get("tracebacks"):
            print(f"   log: {lp['lines']} warning/error lines, {lp['tracebacks']} tracebacks")
            for g in lp["groups"][:8]:
                print(f"     {g['count']:5} x {g['example'][:220]}")
        prof = mres.get("profile")
        if prof and "error" not in prof:
            print(f"\n   profile of the server's gunicorn worker (py-spy, "
                  f"{prof['rate_docs_per_s']:.1f} small docs/s, worker CPU "
                  f"{prof['worker_cpu_utilisation']:.0%} of one core):")
            print("   CPU use during the pass (cores): " + ", ".join(
                f"{k} {v:.2f}" for k, v in prof["cpu_utilisation"].items() if v >= 0.005))
            titles = {"gil": "holding the GIL", "active": "all non-idle threads"}
            titles.update({kind: f"{kind.removesuffix('-gil')}, holding the GIL"
                           for kind in prof if kind.startswith("worker-")})
            titles["secantusd-gil"] = "the SecantusDB server, holding the GIL"
            for kind, title in titles.items():
                if kind not in prof:
                    continue
                p = prof.get(kind, {})
                if "self" not in p:
                    print(f"   {kind}: {p.get('error')}")
                    continue
                print(f"   [{title}: {p['samples']} samples]")
                print("   by library/module (self): " + ", ".join(
                    f"{a['frame']} {a['share']:.0%}" for a in p["by_area_self"][:10]))
                print("   by library/module (inclusive): " + ", ".join(
                    f"{a['frame']} {a['share']:.0%}" for a in p["by_area_inclusive"][:14]))
                print("   top self:")
                for f in p["self"][:12]:
                    print(f"     {f['share']:6.1%}  {f['frame'][:110]}")
                print("   top project frames (inclusive):")
                for f in p["project_inclusive"][:12]:
                    print(f"     {f['share']:6.1%}  {f['frame'][:110]}")
        elif prof:
            print(f"   profile: {prof.get('error')}")
    print("\n== targets (services mode) ==")
    for t in result["targets"]:
        state = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"  {state:6} {t['target']}: {_fmt(t['value'], '{:.2f}')} {t['unit']} "
              f"(limit {t['limit']:g})")
    if result["problems"]:
        print("\n== problems ==")
        for p in result["problems"][:30]:
            print("  " + p)


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
        fdocs = floor_best(result["floor"], name, "docs_per_s")
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
            ax_t.axhline(fdocs, color="green", ls="--", lw=1, label="floor (best)")
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


def flatten(result: dict[str, Any]) -> dict[str, float]:
    """The headline figures, by name, for --compare."""
    out: dict[str, float] = {}
    for name, entry in result.get("floor", {}).items():
        for kind in ("sequential", "concurrent"):
            if kind in entry:
                out[f"floor/{name}/{kind}/docs_per_s"] = entry[kind]["docs_per_s"]
                out[f"floor/{name}/{kind}/mib_per_s"] = entry[kind]["mib_per_s"]
    for name, entry in result.get("floor_end", {}).items():
        if "concurrent" in entry:
            out[f"floor_end/{name}/concurrent/docs_per_s"] = entry["concurrent"]["docs_per_s"]
    for mode, mres in result.get("modes", {}).items():
        for name, wl in mres.get("workloads", {}).items():
            p = f"{mode}/{name}"
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
        print(f"{key:58} {_fmt(va, '{:.3f}'):>10} {_fmt(vb, '{:.3f}'):>10} {change:>8}")


# --------------------------------------------------------------------------- main


def run_floor(h: Harness, workloads: list[Workload], mongo_uri: str,
              mongo_pid: int) -> dict[str, Any]:
    """bench/floor.py once per size, with the services' CPU around it."""
    infra = {"secantusd": mongo_pid, "fcm-stub": h.fcm_pid,
             **procs.find_by_name(("beam.smp", "redis-server"))}
    floor: dict[str, Any] = {}
    for w in workloads:
        spec = json.dumps([{"name": w.name, "size": documents.document_size(w.size),
                            "sequential": w.floor_sequential, "concurrent": w.floor_concurrent,
                            "concurrency": w.concurrency}])
        out = h.work / f"floor-{w.name}.json"
        before = {k: (procs.cpu_times(pid) or procs.CpuTimes(0, 0, 0, 0)).total
                  for k, pid in infra.items()}
        subprocess.run([sys.executable, "-m", "bench.floor", "--amqp-url", AMQP_URL,
                        "--mongodb-uri", mongo_uri, "--fcm-dir", str(h.fcm_dir),
                        "--work-dir", str(h.work / "floor"), "--spec", spec,
                        "--out", str(out)], cwd=ROOT, check=True, timeout=1800)
        after = {k: (procs.cpu_times(pid) or procs.CpuTimes(0, 0, 0, 0)).total
                 for k, pid in infra.items()}
        entry = json.loads(out.read_text())[w.name]
        docs = w.floor_sequential + w.floor_concurrent + 1  # + the warm-up document
        entry["services_cpu_s_per_doc"] = {k: (after[k] - before[k]) / docs for k in infra}
        floor[w.name] = entry
    return floor


def start_fcm(work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    fcm_dir = work / "fcm"
    proc = subprocess.Popen([sys.executable, "-m", "bench.fcm_server", "--dir", str(fcm_dir)],
                            cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=(work / "fcm.log").open("wb"))
    deadline = time.monotonic() + 60
    while not (fcm_dir / "base_url").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the FCM stub did not start; see " + str(work / "fcm.log"))
        time.sleep(0.1)
    return proc, fcm_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small counts (200/20/1, a 50 MiB large) for a fast check")
    parser.add_argument("--compare", type=Path, help="an earlier result JSON to compare with")
    parser.add_argument("--modes", default="embedded,services",
                        help="comma-separated: embedded, services (default both)")
    parser.add_argument("--workers", type=int, default=1,
                        help="services mode: run N `docproc worker` processes per event "
                             "function next to `docproc serve --http-only` (default 1; 0: "
                             "serve consumes the events itself)")
    parser.add_argument("--serve-processes", type=int, default=1,
                        help="with --workers: gunicorn processes of `docproc serve` (default 1)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy passes")
    parser.add_argument("--retry-writes", action="store_true",
                        help="leave pymongo's retryable writes on against the SecantusDB server "
                             "(floor and services mode); by default the URI carries "
                             "retryWrites=false, see bench/README.md")
    parser.add_argument("--replica-set", action="store_true",
                        help="run the SecantusDB server as a single-node replica set, with its "
                             "oplog (results before 2026-12-02T12:30Z were measured so); "
                             "implied by --retry-writes, which a standalone server does not "
                             "support")
    parser.add_argument("--max-minutes", type=float, default=40.0,
                        help="time budget; later steps are skipped past it (default 40)")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="cap on one open-loop step's send duration (default 60, quick 20)")
    parser.add_argument("--workloads", default="small,medium,large",
                        help="comma-separated: small, medium, large (default all; the profile "
                             "pass needs small)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory")
    parser.add_argument("--set", action="append", default=[], metavar="DOCPROC_NAME=VALUE",
                        help="a setting for the docproc processes, e.g. to compare one value "
                             "with another (repeatable; the result files get a -set suffix)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("embedded", "services") for m in modes):
        parser.error("--modes takes embedded and/or services")
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    workloads = [w for w in plans(args.quick) if w.name in chosen]
    if not workloads or len(workloads) != len(set(chosen)):
        parser.error("--workloads takes small, medium and/or large")
    settings: dict[str, str] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("DOCPROC_"):
            parser.error(f"--set takes DOCPROC_NAME=VALUE, not {item!r}")
        settings[name] = value
    # A standalone server does not support retryable writes.
    replica_set = args.replica_set or args.retry_writes
    # latest.json is the default run; variants keep their own "latest" files.
    variant = [part for part, on in (
        ("quick", args.quick), ("-".join(modes), set(modes) != {"embedded", "services"}),
        (f"workers{args.workers}", args.workers != 1),
        (f"serve{args.serve_processes}", args.workers > 0 and args.serve_processes > 1),
        ("retry-writes", args.retry_writes),
        ("replica-set", replica_set and not args.retry_writes), ("set", bool(settings)),
        ("-".join(chosen), len(workloads) < 3))
        if on]
    latest = "-".join(["latest", *variant])
    run_id = secrets.token_hex(3)
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix=f"docproc-bench-{run_id}-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "version": 1, "started": started.isoformat(timespec="seconds"), "quick": args.quick,
        "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "config": {w.name: {"size": w.size, "concurrency": w.concurrency, "total": w.total,
                            "steps": [asdict(s) for s in w.steps],
                            "floor": [w.floor_sequential, w.floor_concurrent]}
                   for w in workloads},
        "modes": {}, "problems": [], "retry_writes": args.retry_writes,
        "mongo_topology": "replica set" if replica_set else "standalone",
        "settings": settings,
    }
    print(f"docproc bench {run_id}: work dir {work}; load average "
          f"{result['machine']['loadavg_at_start']}", flush=True)
    t0 = time.monotonic()
    fcm, fcm_dir = start_fcm(work)
    h = Harness(run_id, work, fcm_dir, fcm.pid, Receipts(fcm_dir / "receipts.jsonl"),
                deadline=t0 + args.max_minutes * 60,
                step_seconds=args.step_seconds or (20.0 if args.quick else 60.0),
                retry_writes=args.retry_writes,
                replica_set=replica_set, quick=args.quick,
                settings=settings)
    try:
        with mongo_server(h, "floor") as (mongo_uri, mongo_pid):
            print("floor ...", flush=True)
            result["floor"] = run_floor(h, workloads, mongo_uri, mongo_pid)
        for mode in modes:
            profile = None
            if not args.no_profile and "small" in chosen:
                profile = {"fraction": 0.9,
                           "out": f"{latest}-{mode}"}
            if mode == "services":
                with mongo_server(h, mode) as (mongo_uri, mongo_pid):
                    result["modes"][mode] = run_mode(h, mode, workloads, mongo_uri,
                                                     mongo_pid, args.workers, profile,
                                                     args.serve_processes)
            else:
                result["modes"][mode] = run_mode(h, mode, workloads, "", 0, 0, profile)
        # The small documents' floor once more: the machine's speed drifts (other tenants of
        # the host), and a ratio means little if the floor moved under the run.
        small = [w for w in workloads if w.name == "small"]
        if small:
            with mongo_server(h, "floor-end") as (mongo_uri, mongo_pid):
                result["floor_end"] = run_floor(h, small, mongo_uri, mongo_pid)
    finally:
        stop_process(fcm)
        result["problems"] = h.problems
        result["duration_s"] = round(time.monotonic() - t0, 1)
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    result["targets"] = targets(result)
    print_report(result)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    name = "-".join([stamp, *variant])
    text = json.dumps(result, indent=1, default=str)
    (RESULTS / f"{name}.json").write_text(text)
    (RESULTS / f"{latest}.json").write_text(text)
    try:
        chart(result, RESULTS / f"{latest}.png")
    except Exception as exc:
        print(f"chart: {exc}")
    print(f"\nwrote bench/results/{name}.json, bench/results/{latest}.json and "
          f"{latest}.png in {result['duration_s']:.0f} s")
    if args.compare:
        compare(args.compare, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
