"""The machine a result was measured on: CPU, memory, kernel, Python and the versions of the
packages and services."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pika
import redis

from bench.modes import AMQP_URL, REDIS_URL


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


def _python_work() -> None:
    record = {"id": "0" * 32, "owner": "driver-0001", "size": 65536, "tags": ["a", "b"]}
    for _ in range(20):
        json.loads(json.dumps(record))
    items = [(str(i * 7919 % 1000), i) for i in range(300)]
    items.sort(key=lambda item: item[0])
    sum(n % 7 for _, n in items)


def interpreter_ms() -> float:
    """CPU milliseconds this interpreter takes for a fixed piece of plain Python work (JSON
    and sorting), best of five. Builds of one Python version differ by a fifth and more
    (pyenv's default build against Debian's, bench/README.md Finding 41), and the pipeline,
    the floor's script and the SecantusDB server all run on it."""
    for _ in range(20):
        _python_work()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(200):
            _python_work()
        best = min(best, time.process_time() - start)
    return round(best * 1000, 1)


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
            "python_executable": sys.executable, "python_work_ms": interpreter_ms(),
            "loadavg_at_start": os.getloadavg(), "versions": versions()}
