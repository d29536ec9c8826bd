"""One mode of ``docproc serve`` run under the workloads: ``embedded`` (in-process bus,
embedded SecantusDB) or ``services`` (RabbitMQ, Redis and a SecantusDB server process), its
processes started, tracked and stopped, and the services cleaned up after it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import redis
import requests
from pymongo import MongoClient

from bench import documents, procs
from bench.harness import BIN, ROOT, Harness, Tracked
from bench.load import Client
from bench.logs import log_events, log_problems, mark_log_events
from bench.procs import MIB
from bench.profiling import run_profile
from bench.workloads import Workload, run_workload

AMQP_URL = os.environ.get("DOCPROC_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("DOCPROC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0)  # the default schedule: topology.delete needs it
USERS = 8


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
             serve_processes: int = 1,
             beside: Callable[[Workload, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Runs ``docproc serve`` (and workers) under the workloads; with ``beside``, each
    workload's floor is measured right before and right after it (``floor_beside``)."""
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
        tracked.start_sampling()
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
        client = Client("127.0.0.1", port, users, f"{h.run_id}{mode[0]}",
                        fresh_connections=h.fresh_connections)
        result["workloads"] = {}
        try:
            for wl in workloads:
                before = beside(wl, "before") if beside else None
                entry = run_workload(h, client, tracked, mongo, db_name, wl)
                if beside and before:
                    entry["floor_beside"] = {"before": before, "after": beside(wl, "after")}
                result["workloads"][wl.name] = entry
            if profile is not None:
                result["profile"] = run_profile(h, client, tracked, result, profile)
        finally:
            mongo.close()
            tracked.stop_sampling()
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
