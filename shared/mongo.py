"""MongoDB connections: a real server by URI, or SecantusDB serving the wire protocol in-process.

SecantusDB keeps its files in one directory that only one process may open, so the embedded
database belongs to a single process (``docproc serve`` or one function run alone); functions
running as separate processes must share a real server through ``MONGODB_URI``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, PyMongoError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
)

from shared.config import ConfigError, Settings

log = logging.getLogger(__name__)

# pymongo waits 30 s by default for a server; a request should fail fast with 503 instead.
SERVER_SELECTION_TIMEOUT_MS = 3000
EMBEDDED_URI_FILE = "mongo.uri"


@dataclass
class MongoHandle:
    client: MongoClient[dict[str, Any]]
    db: Database[dict[str, Any]]
    embedded: Any = field(default=None, repr=False)
    uri_file: Path | None = None

    def close(self) -> None:
        self.client.close()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
            if self.uri_file is not None:
                self.uri_file.unlink(missing_ok=True)


def unreachable(exc: ConnectionFailure) -> str:
    """The reason in one line: pymongo's message goes on with the timeouts it was given and
    the whole topology, which an operator reading a start-up failure does not need."""
    text = str(exc).split(", Timeout: ")[0].split(", Topology Description: ")[0]
    return text.split(" (configured timeouts")[0].strip() or type(exc).__name__


def wait_for_database(prepare: Callable[[], None], seconds: float) -> None:
    """Run ``prepare`` (the first database work of a process that starts), trying again
    while no server answers, for up to ``seconds``. A refusal by a server that does answer
    (bad credentials, say) is not waited out."""

    def waiting(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("waiting for the database (%.0f of %.0f s): %s",
                    state.seconds_since_start or 0.0, seconds,
                    unreachable(exc) if isinstance(exc, ConnectionFailure) else exc)

    for attempt in Retrying(stop=stop_before_delay(seconds),
                            wait=wait_exponential(multiplier=0.5, max=10.0),
                            retry=retry_if_exception_type(ConnectionFailure),
                            before_sleep=waiting, reraise=True):
        with attempt:
            prepare()


def running_embedded_uri(settings: Settings) -> str | None:
    """The wire address of the embedded database another process serves right now, if any."""
    marker = settings.data_dir / EMBEDDED_URI_FILE
    try:
        uri = marker.read_text().strip()
    except FileNotFoundError:
        return None
    probe: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=500)
    try:
        probe.admin.command("ping")
    except PyMongoError:
        return None  # left behind by a process that died
    finally:
        probe.close()
    return uri


def require_own_embedded(settings: Settings) -> None:
    """Refuse to run a pipeline on the embedded database another process serves: its bus
    and this one would take the same events, and it goes when that process stops."""
    if settings.mongodb_uri:
        return
    uri = running_embedded_uri(settings)
    if uri is not None:
        raise ConfigError(
            f"another docproc process serves the embedded database of "
            f"{settings.data_dir.resolve()} (at {uri}): stop it, or give this one a data "
            "directory of its own (DOCPROC_DATA_DIR)")


def open_mongo(settings: Settings) -> MongoHandle:
    embedded = None
    uri = settings.mongodb_uri or running_embedded_uri(settings)
    if uri is None:
        from secantus import SecantusDBServer

        path = settings.embedded_mongo_dir
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        # replica_set_name=None: no oplog, which nothing here needs; a small cache keeps the
        # embedded process lean; durable so a killed `docproc serve` loses no record.
        embedded = SecantusDBServer(
            host="127.0.0.1",
            port=0,
            storage_path=str(path),
            replica_set_name=None,
            cache_size="64M",
            durable=True,
        )
        embedded.start()
        uri = embedded.uri
        # Commands run beside `docproc serve` (dlq, reprocess, backup) find it here: the
        # embedded files can only be opened by one process at a time.
        (settings.data_dir / EMBEDDED_URI_FILE).write_text(uri)
        log.info("embedded MongoDB wire server (SecantusDB) at %s, data in %s", uri, path)
    # Retryable writes cost SecantusDB more with every write (a session table it keeps);
    # the embedded single-process server has no failover for them to survive anyway. A
    # configured URI keeps the say: pymongo lets keyword options override the URI's, so
    # `retryWrites` is passed only for the embedded server.
    options: dict[str, Any] = {} if settings.mongodb_uri else {"retryWrites": False}
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri, serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS, tz_aware=True, **options,
    )
    return MongoHandle(client=client, db=client[settings.mongodb_database], embedded=embedded,
                       uri_file=settings.data_dir / EMBEDDED_URI_FILE if embedded else None)
