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
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import documents, procs
from bench.chart import chart
from bench.compare import compare
from bench.harness import RESULTS, ROOT, Harness, Receipts
from bench.machine import machine
from bench.modes import AMQP_URL, mongo_server, run_mode, stop_process
from bench.report import print_report, targets
from bench.workloads import Workload, plans


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


def floor_beside(h: Harness, w: Workload, when: str) -> dict[str, Any]:
    """The workload's floor again, right before or after the services mode runs it.

    The machine's speed drifts within a run (the host's other tenants): the small floor
    has measured 16-37% apart between a run's start and its end. A floor measured beside
    the workload, against a fresh SecantusDB server as the first, is the one its ratios
    use; written-back pages first, so that what the pipeline left does not slow it."""
    os.sync()
    with mongo_server(h, f"floor-{w.name}-{when}") as (mongo_uri, mongo_pid):
        entry: dict[str, Any] = run_floor(h, [w], mongo_uri, mongo_pid)[w.name]
    return entry


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
    parser.add_argument("--fresh-connections", action="store_true",
                        help="a new HTTP connection per upload, as a phone talking to the server "
                             "directly would make (default: each client thread keeps its "
                             "connection, as Kong and Knative's queue-proxy do)")
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
        ("fresh", args.fresh_connections),
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
        "client_connections": "fresh per upload" if args.fresh_connections else "kept",
    }
    facts = result["machine"]
    print(f"docproc bench {run_id}: work dir {work}; load average "
          f"{facts['loadavg_at_start']}; Python {facts['python']} "
          f"({facts['python_executable']}, {facts['python_work_ms']} ms of plain Python work)",
          flush=True)
    t0 = time.monotonic()
    fcm, fcm_dir = start_fcm(work)
    h = Harness(run_id, work, fcm_dir, fcm.pid, Receipts(fcm_dir / "receipts.jsonl"),
                deadline=t0 + args.max_minutes * 60,
                step_seconds=args.step_seconds or (20.0 if args.quick else 60.0),
                retry_writes=args.retry_writes,
                replica_set=replica_set, quick=args.quick,
                settings=settings, fresh_connections=args.fresh_connections)
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
                    result["modes"][mode] = run_mode(
                        h, mode, workloads, mongo_uri, mongo_pid, args.workers, profile,
                        args.serve_processes,
                        beside=lambda w, when: floor_beside(h, w, when))
            else:
                result["modes"][mode] = run_mode(h, mode, workloads, "", 0, 0, profile)
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
