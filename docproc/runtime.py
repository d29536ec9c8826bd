"""Everything a function needs, built once per process from the settings.

Each dependency is chosen by configuration alone: a real service when its variable is set,
the embedded stand-in otherwise (README, "Configuration").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pymongo.errors import ConnectionFailure
from werkzeug.exceptions import BadRequest, ServiceUnavailable

from events.cloudevent import MalformedEvent
from events.publisher import AmqpPublisher, HttpSinkPublisher, Publisher
from events.subscriptions import RetryPolicy
from shared.audit import AuditLog
from shared.blobstore import BlobStore
from shared.cache import Cache, MemoryCache, RedisCache
from shared.config import Settings, load_settings
from shared.deliveries import DeliveryRepository
from shared.documents import DocumentRepository
from shared.keys import KeyProvider, KmsKeyProvider, LocalKeyring
from shared.links import KeyringFile, LinkKey, LinkSigner, configured_keys
from shared.mongo import MongoHandle, open_mongo, unreachable, wait_for_database
from shared.observability import HANDLED, setup_logging
from shared.outbox_marks import PublishedMarks
from shared.push import FcmSender, OutboxSender, PushSender
from shared.users import LOCAL_USER_CACHE_TTL, USER_CACHE_TTL, UserRepository

log = logging.getLogger(__name__)


class NoTransport(Exception):
    pass


@dataclass
class Services:
    settings: Settings
    mongo: MongoHandle
    documents: DocumentRepository
    users: UserRepository
    deliveries: DeliveryRepository
    audit: AuditLog
    blobs: BlobStore
    keys: KeyProvider
    cache: Cache
    links: LinkSigner
    push: PushSender
    marks: PublishedMarks
    publisher: Publisher | None = None
    _closers: list[Any] = field(default_factory=list, repr=False)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.settings.retry_delays)

    def publish(self, event: Any) -> None:
        if self.publisher is None:
            raise NoTransport(
                "no event transport: set AMQP_URL (RabbitMQ) or K_SINK (Knative), "
                "or run every function together with `docproc serve`"
            )
        self.publisher.publish(event)

    def close(self) -> None:
        for closer in (self.marks, self.publisher, self.push, self.cache):
            close = getattr(closer, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing %r", closer)
        self.mongo.close()


def build_services(settings: Settings, publisher: Publisher | None = None,
                   wait_for_database_seconds: float = 0.0) -> Services:
    """Everything a function uses. ``wait_for_database_seconds``: how long a process that
    starts waits for a MongoDB server that does not answer yet; a one-off command fails at
    once instead."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mongo = open_mongo(settings)
    cache: Cache = (
        RedisCache(settings.redis_url, settings.redis_prefix)
        if settings.redis_url
        else MemoryCache()
    )
    keys: KeyProvider = (
        KmsKeyProvider(settings.kms_key_id) if settings.kms_key_id
        else LocalKeyring(settings.keys_dir)
    )
    push: PushSender = (
        FcmSender(settings.firebase_credentials, endpoint=settings.fcm_endpoint)
        if settings.firebase_credentials else OutboxSender(settings.outbox_path)
    )
    given = publisher
    if publisher is None:
        if settings.amqp_url:
            publisher = AmqpPublisher(settings.amqp_url, settings.amqp_prefix,
                                      settings.retry_delays)
        elif settings.k_sink:
            publisher = HttpSinkPublisher(settings.k_sink)
    documents = DocumentRepository(mongo.db, timedelta(seconds=settings.outbox_grace_seconds))
    svc = Services(
        settings=settings,
        mongo=mongo,
        documents=documents,
        # Without Redis each process caches users on its own; sharing the database with
        # others (MONGODB_URI), it cannot hear of their changes, so it keeps them briefly.
        users=UserRepository(mongo.db, cache, USER_CACHE_TTL if settings.redis_url
                             or not settings.mongodb_uri else LOCAL_USER_CACHE_TTL),
        deliveries=DeliveryRepository(mongo.db),
        audit=AuditLog(mongo.db),
        blobs=BlobStore(settings.efs_root),
        keys=keys,
        cache=cache,
        links=LinkSigner(link_keys(settings), settings.public_url),
        push=push,
        marks=PublishedMarks(documents, settings.outbox_mark_linger_seconds),
        publisher=publisher,
    )

    def prepare() -> None:
        # An embedded database this process started is its alone: no older version can be
        # writing to it. One that another process serves (a command run beside `docproc
        # serve`) may be an older version's, which still needs what the migration drops.
        svc.documents.ensure_indexes(migrate=mongo.embedded is not None)
        for other in (svc.users, svc.deliveries, svc.audit):
            other.ensure_indexes()

    try:
        wait_for_database(prepare, wait_for_database_seconds)
    except BaseException:
        if given is not None:
            svc.publisher = None  # the caller's to close
        svc.close()
        raise
    return svc


def link_keys(settings: Settings) -> list[LinkKey] | KeyringFile:
    until = settings.link_previous_key_until
    return configured_keys(settings.link_key, settings.link_previous_key,
                           until.timestamp() if until else None, settings.keys_dir)


_current: Services | None = None
_lock = threading.Lock()
# After building failed for want of a database, requests within this time fail at once
# with the same reason: each try waits 3 s for a server, one thread at a time, and five
# probes queued behind each other answered after 3, 6, 9, 12 and 15 s.
BUILD_RETRY_AFTER = 2.0
_failed: tuple[float, str] | None = None  # (monotonic time to try again, why)


def services() -> Services:
    """The process's services, built from the environment on first use."""
    global _current, _failed
    if _current is None:
        with _lock:
            if _current is None:
                if _failed is not None and time.monotonic() < _failed[0]:
                    raise ConnectionFailure(_failed[1])
                from docproc import heap
                from docproc.outbox import OutboxRelay

                setup_logging()
                try:
                    _current = build_services(load_settings())
                except ConnectionFailure as exc:
                    _failed = (time.monotonic() + BUILD_RETRY_AFTER, unreachable(exc))
                    raise
                _failed = None
                # A function run alone publishes too, so it relays its leftovers as well.
                OutboxRelay(_current).start()
                heap.settle()
    return _current


@contextmanager
def as_http_status(event: Any, function: str) -> Iterator[None]:
    """Handling one event delivered over HTTP (functions-framework, as Knative delivers):
    an event that can never succeed is recorded as a dead letter here and answers 400, which
    Knative does not retry; other failures stay 5xx, which it retries with backoff."""
    from events.cloudevent import handling
    from shared.knative_dead_letters import COLLECTION, record

    try:
        with handling(event, function):
            yield
    except MalformedEvent as exc:
        HANDLED.labels(function, "malformed").inc()
        # Kept here, where `docproc dlq` finds it, because eventing-rabbitmq takes a 400 as
        # delivered (it retries and dead-letters only 5xx, 404, 408, 409 and 429) and would
        # drop it. Should keeping it fail, the 500 that follows has it retried, not lost.
        try:
            record(services().mongo.db[COLLECTION], function, event, refused=str(exc))
        except ConnectionFailure as down:
            raise _database_away(down) from exc
        raise BadRequest(str(exc)) from exc
    except ConnectionFailure as exc:
        HANDLED.labels(function, "failed").inc()
        raise _database_away(exc) from exc
    except Exception:
        HANDLED.labels(function, "failed").inc()
        raise
    HANDLED.labels(function, "ok").inc()


def _database_away(exc: ConnectionFailure) -> ServiceUnavailable:
    """A 503, which Knative retries with backoff, in one log line rather than the traceback
    functions-framework logs for the 500 of any other exception."""
    log.warning("database unavailable: %s", unreachable(exc))
    return ServiceUnavailable("database unavailable, retry later")


def install(svc: Services | None) -> None:
    """Make ``svc`` the process's services (``docproc serve``, tests)."""
    global _current
    with _lock:
        _current = svc
