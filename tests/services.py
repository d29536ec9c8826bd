"""Real services for the tests: RabbitMQ and Redis as the machine runs them, and a SecantusDB
server (the MongoDB wire protocol) started as its own process for the test session.

Every test gets its own exchange/queue prefix, Redis key prefix, MongoDB database and data
directory, and removes them afterwards, so runs sharing the machine never see each other.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pymongo
import pytest
import redis
from pymongo import monitoring
from pymongo.database import Database

from shared.documents import DocumentRepository

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
AMQP_URL = os.environ.get("DOCPROC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("DOCPROC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require(service: str, problem: str | None) -> None:
    """Skip a test whose service is missing; in CI a missing service fails the run."""
    if problem is None:
        return
    message = f"{service} is not reachable: {problem}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: real-service tests must run)", pytrace=False)
    pytest.skip(message)


def check_amqp(url: str) -> str | None:
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


def check_redis(url: str) -> str | None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return str(exc)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MongoServer:
    """``secantusd-py`` in a process of its own, so tests can stop and restart it.

    Standalone, like the embedded default and ``mongod`` out of the box: a replica-set
    advertisement makes the server write an oplog entry per changed record for change streams,
    which docproc does not use."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        exe = Path(sys.executable).with_name("secantusd-py")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(exe), "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", str(self.storage), "--log-level", "WARNING", "--standalone"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"secantusd-py exited with {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("secantusd-py did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def mongo_server(storage: Path) -> Iterator[MongoServer]:
    server = MongoServer(storage)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


@contextmanager
def scratch_database(server: MongoServer, prefix: str,
                     listeners: tuple[monitoring.CommandListener, ...] = ()
                     ) -> Iterator[Database[dict[str, Any]]]:
    """A database of its own on ``server``, dropped afterwards."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        server.uri + "?retryWrites=false", tz_aware=True, event_listeners=list(listeners))
    name = unique(prefix)
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


@contextmanager
def documents_repository(server: MongoServer, prefix: str,
                         listeners: tuple[monitoring.CommandListener, ...] = ()
                         ) -> Iterator[DocumentRepository]:
    """A DocumentRepository with its indexes in a database of its own, dropped afterwards."""
    with scratch_database(server, prefix, listeners) as db:
        repository = DocumentRepository(db)
        repository.ensure_indexes()
        yield repository


def purge_redis(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
