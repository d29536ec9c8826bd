"""The machine a result was measured on: CPU, memory, kernel, Python and the versions of the
packages and services."""

from __future__ import annotations

import contextlib
import os
import platform
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
