"""Shared fixtures: settings for a test's own corner of every service, and a running pipeline."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
import requests
from werkzeug.serving import make_server

from docproc.pipeline import Pipeline
from events import topology
from shared.config import Settings, load_settings
from tests.fcm_stub import FcmStub
from tests.helpers import nonblocking
from tests.services import (
    AMQP_URL,
    REDIS_URL,
    MongoServer,
    check_amqp,
    check_redis,
    mongo_server,
    purge_redis,
    require,
    unique,
)

FAST_RETRIES = (0.2, 0.5)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """CLI entry points called in-process point the root logger at the stderr pytest
    captures for that test; later tests' threads must not log into it once it is closed."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    require("RabbitMQ", check_amqp(AMQP_URL))
    return AMQP_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    require("Redis", check_redis(REDIS_URL))
    return REDIS_URL


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    with mongo_server(tmp_path_factory.mktemp("secantus")) as server:
        yield server


@pytest.fixture
def fcm() -> Iterator[FcmStub]:
    with FcmStub() as stub:
        yield stub


@pytest.fixture
def service_settings(
    tmp_path: Path, amqp_url: str, redis_url: str, mongo: MongoServer, fcm: FcmStub
) -> Iterator[Callable[..., Settings]]:
    """Build settings on the real services, each test in its own namespace."""
    prefix = unique("docproc-test-")
    redis_prefix = prefix + ":"
    credentials = fcm.write_service_account(tmp_path / "firebase.json")
    made: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "mongodb_uri": mongo.uri,
            "mongodb_database": prefix.replace("-", "_"),
            "amqp_url": amqp_url,
            "amqp_prefix": prefix,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "firebase_credentials": credentials,
            "fcm_endpoint": fcm.base_url,
            "retry_delays": FAST_RETRIES,
            "outbox_grace_seconds": 0.5,
            "outbox_mark_linger_seconds": 0.1,
            "relay_interval_seconds": 0.2,
        }
        values.update(overrides)
        settings = load_settings(**values)
        made.append(settings)
        return settings

    yield make
    # Every retry delay a test asked for has a queue of its own to remove.
    delays = tuple(sorted({*FAST_RETRIES, *(d for s in made for d in s.retry_delays)}))
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        topology.delete(conn.channel(), prefix, delays)
    finally:
        conn.close()
    purge_redis(redis_url, redis_prefix)
    import pymongo

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo.uri)
    client.drop_database(prefix.replace("-", "_"))
    client.close()


@dataclass
class Running:
    pipeline: Pipeline
    base_url: str

    @property
    def svc(self) -> Any:
        return self.pipeline.services

    def url(self, path: str) -> str:
        return self.base_url + path


class _Late:
    """A WSGI app whose pipeline arrives after the server has its port (the public URL)."""

    app: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


@contextmanager
def serving(make_settings: Callable[..., Settings], consumers: bool = True,
            **overrides: Any) -> Iterator[Running]:
    """The whole pipeline in this process behind a real HTTP server on a loopback port
    (without the event functions when ``consumers`` is false)."""
    late = _Late()
    server = nonblocking(make_server("127.0.0.1", 0, late, threaded=True))
    base = f"http://127.0.0.1:{server.server_port}"
    pipeline = Pipeline(make_settings(public_url_override=base, **overrides),
                        consumers=consumers).start()
    late.app = pipeline.wsgi_app
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Running(pipeline, base)
    finally:
        server.shutdown()
        thread.join(5)
        pipeline.stop()


@pytest.fixture
def running(service_settings: Callable[..., Settings]) -> Iterator[Running]:
    with serving(service_settings) as run:
        yield run


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
