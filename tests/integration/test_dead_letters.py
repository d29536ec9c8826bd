"""Failing handlers retry with backoff and then land in a dead-letter queue with the reason,
on RabbitMQ and on the embedded bus alike; nothing is dropped silently."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pika
import pymongo
import pytest
from cloudevents.http import CloudEvent

from events import topology
from events.bus import InProcessBus
from events.catalog import DOCUMENT_UPLOADED, DocumentUploaded
from events.cloudevent import make_event
from events.runner import ATTEMPT_HEADER, DEAD_REASON_HEADER, RabbitRunner
from events.subscriptions import RetryPolicy, Subscription
from shared.config import Settings
from shared.documents import Document, Status, utcnow
from shared.ids import new_document_id
from tests.conftest import Running
from tests.helpers import Commands, wait_for
from tests.services import MongoServer, unique

pytestmark = pytest.mark.services


def _event(doc_id: str | None = None) -> CloudEvent:
    doc_id = doc_id or new_document_id()
    return make_event(
        DOCUMENT_UPLOADED, "/tests", doc_id,
        DocumentUploaded(document_id=doc_id, owner="driver-1", filename="x.pdf",
                         declared_type="application/pdf", size=10, sha256="0" * 64),
    )


def _get_dead(settings: Settings, fn: str) -> tuple[Any, bytes] | None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        method, props, body = conn.channel().basic_get(
            topology.dead_letter_queue(settings.amqp_prefix, fn), auto_ack=True)
        return (props, body) if method else None
    finally:
        conn.close()


def test_storage_handler_that_keeps_failing_is_dead_lettered_with_reason(
    running: Running,
) -> None:
    """A document whose staged object has gone missing cannot be stored, however often the
    event is retried: after the backoff schedule it must end in the DLQ, with the reason."""
    svc = running.svc
    doc_id = new_document_id()
    _, wrapped = svc.keys.generate({"document_id": doc_id})
    now = utcnow()
    svc.documents.insert(Document(
        _id=doc_id, owner="driver-1", filename="lost.pdf", declared_type="application/pdf",
        size=10, sha256="0" * 64, status=Status.PROCESSING, created_at=now, updated_at=now,
        wrapped_key=wrapped.to_doc(), upload_event_id=new_document_id()))
    svc.publish(_event(doc_id))

    props, body = wait_for(lambda: _get_dead(svc.settings, "storage"), what="a dead letter")
    headers = props.headers
    assert "FileNotFoundError" in headers[DEAD_REASON_HEADER]
    assert headers[ATTEMPT_HEADER] == len(svc.settings.retry_delays) + 1
    assert json.loads(body)["document_id"] == doc_id
    assert props.headers["cloudEvents_subject"] == doc_id
    record = svc.documents.get(doc_id)
    assert record is not None
    assert record.status == Status.PROCESSING  # visible for reprocessing, not half-stored


def test_malformed_event_is_dead_lettered_at_once(running: Running) -> None:
    settings = running.svc.settings
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        chan = conn.channel()
        chan.confirm_delivery()
        chan.basic_publish(
            topology.exchange(settings.amqp_prefix), DOCUMENT_UPLOADED, b'{"document_id": 7}',
            pika.BasicProperties(content_type="application/json", headers={
                "cloudEvents_specversion": "1.0", "cloudEvents_id": "bad-1",
                "cloudEvents_source": "/tests", "cloudEvents_type": DOCUMENT_UPLOADED}),
            mandatory=True)
    finally:
        conn.close()
    props, _ = wait_for(lambda: _get_dead(settings, "storage"), what="a dead letter")
    assert props.headers[ATTEMPT_HEADER] == 1
    assert "MalformedEvent" in props.headers[DEAD_REASON_HEADER]
    assert "document_id" in props.headers[DEAD_REASON_HEADER]


def test_runner_retries_a_transient_failure_then_succeeds_once(
    service_settings: Callable[..., Settings],
) -> None:
    settings = service_settings()
    seen: list[str] = []
    done = threading.Event()

    def flaky(event: CloudEvent) -> None:
        seen.append(str(event["id"]))
        if len(seen) < 3:
            raise ConnectionError("database briefly unreachable")
        done.set()

    runner = RabbitRunner(settings.amqp_url or "", settings.amqp_prefix,
                          Subscription("storage", flaky), RetryPolicy(settings.retry_delays), 2)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(10)
        from events.publisher import AmqpPublisher

        publisher = AmqpPublisher(settings.amqp_url or "", settings.amqp_prefix,
                                  settings.retry_delays)
        event = _event()
        publisher.publish(event)
        publisher.close()
        assert done.wait(15)
        assert seen == [event["id"]] * 3
        assert _get_dead(settings, "storage") is None
    finally:
        runner.stop()
        thread.join(10)


@pytest.fixture
def bus_db(mongo: MongoServer) -> Iterator[Any]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo.uri)
    name = unique("bus_test_")
    yield client[name]
    client.drop_database(name)
    client.close()


def test_embedded_bus_has_the_same_retry_and_dead_letter_semantics(bus_db: Any) -> None:
    bus = InProcessBus(RetryPolicy((0.05, 0.1)), bus_db, concurrency=2)
    calls = {"always": 0}

    def always(event: CloudEvent) -> None:
        calls["always"] += 1
        raise RuntimeError("disk full")

    bus.subscribe(Subscription("storage", always))
    bus.start()
    try:
        event = _event()
        bus.publish(event)
        assert bus.wait_idle(10)
    finally:
        bus.stop()
    assert calls["always"] == 3
    [dead] = bus.dead_letters("storage")
    assert dead["reason"] == "RuntimeError: disk full"
    assert dead["attempts"] == 3
    stored = json.loads(dead["event"])
    assert stored["id"] == event["id"]
    assert stored["data"]["document_id"] == event.data["document_id"]


def test_embedded_bus_keeps_events_across_a_restart(bus_db: Any) -> None:
    """Queued events survive the process: a new bus on the same database delivers them."""
    first = InProcessBus(RetryPolicy((0.05,)), bus_db, concurrency=1)
    first.subscribe(Subscription("storage", lambda e: None))
    event = _event()
    first.publish(event)  # never started: as if the process died right after accepting it
    seen: list[str] = []
    second = InProcessBus(RetryPolicy((0.05,)), bus_db, concurrency=1, exclusive=True)
    second.subscribe(Subscription("storage", lambda e: seen.append(str(e["id"]))))
    second.start()
    try:
        assert second.wait_idle(10)
    finally:
        second.stop()
    assert seen == [event["id"]]


CRASHER = """
import os, sys
from events.runner import RabbitRunner
from events.subscriptions import RetryPolicy, Subscription

def crash(event):
    os._exit(3)  # as an out-of-memory kill would: no exception, no ack, no goodbye

RabbitRunner(sys.argv[1], sys.argv[2], Subscription("storage", crash),
             RetryPolicy(tuple(float(d) for d in sys.argv[3].split(","))), 1).run()
"""


def test_a_message_that_kills_every_worker_is_dead_lettered_by_the_broker(
    service_settings: Callable[..., Settings],
) -> None:
    import subprocess
    import sys

    from docproc.operations import RabbitDeadLetters
    from events.publisher import AmqpPublisher
    from events.topology import DELIVERY_LIMIT

    settings = service_settings()
    url = settings.amqp_url or ""
    publisher = AmqpPublisher(url, settings.amqp_prefix, settings.retry_delays)
    event = _event()
    publisher.publish(event)
    publisher.close()
    store = RabbitDeadLetters(url, settings.amqp_prefix)
    crashes = 0
    for _ in range(DELIVERY_LIMIT + 3):
        if store.list("storage"):
            break
        run = subprocess.run([sys.executable, "-c", CRASHER, url, settings.amqp_prefix,
                              ",".join(str(d) for d in settings.retry_delays)],
                             timeout=60, capture_output=True, check=False)
        assert run.returncode == 3, run.stderr[-500:]
        crashes += 1
    [letter] = store.list("storage")
    assert letter.id == event["id"]
    assert "delivery_limit" in letter.reason
    assert DELIVERY_LIMIT <= crashes <= DELIVERY_LIMIT + 1


def test_embedded_bus_wakes_one_worker_of_the_right_function_per_event(
    mongo: MongoServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each event is handled once and at once, without polling, and looks at the queue about
    twice (the worker that takes it, and its look for more), not once per idle worker."""
    finds = Commands("find", "bus_messages")
    monkeypatch.setattr("events.bus.POLL_SECONDS", 60.0)  # a missed wake-up would show
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo.uri, event_listeners=[finds])
    name = unique("bus_wake_")
    bus = InProcessBus(RetryPolicy((0.05,)), client[name], concurrency=2)
    handled: list[str] = []
    bus.subscribe(Subscription("storage", lambda e: handled.append(str(e["id"]))))
    bus.subscribe(Subscription("notification", lambda e: None))
    bus.start()
    try:
        wait_for(lambda: finds.count >= 4, what="the workers' first look")
        before = finds.count
        events = [_event() for _ in range(30)]
        for n, event in enumerate(events, 1):
            bus.publish(event)
            wait_for(lambda n=n: len(handled) >= n, timeout=10, what=f"event {n}")  # type: ignore[misc]
        assert bus.wait_idle(10)
    finally:
        bus.stop()
        client.drop_database(name)
        client.close()
    assert sorted(handled) == sorted(str(e["id"]) for e in events)
    # 2 per event measured; 5 when every publish woke all four workers.
    assert finds.count - before <= 4 * len(events), finds.count - before


def test_an_exclusive_bus_leases_in_memory_and_hands_each_event_out_once(
    mongo: MongoServer,
) -> None:
    """The embedded bus alone uses its database: a message is taken without a write to the
    queue, and four workers racing over one function still handle every event once."""
    queue_writes = Commands("update", "bus_messages")
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo.uri, event_listeners=[queue_writes])
    name = unique("bus_exclusive_")
    bus = InProcessBus(RetryPolicy((0.05,)), client[name], concurrency=4, exclusive=True)
    handled: Counter[str] = Counter()

    def slow(event: CloudEvent) -> None:
        time.sleep(0.002)  # long enough for the other workers to look at the queue meanwhile
        handled[str(event["id"])] += 1

    bus.subscribe(Subscription("storage", slow))
    events = [_event() for _ in range(60)]
    for event in events:
        bus.publish(event)
    bus.start()
    try:
        assert bus.wait_idle(20)
    finally:
        bus.stop()
        client.drop_database(name)
        client.close()
    assert handled == Counter({str(e["id"]): 1 for e in events})
    # One write in all: the start's release of what a killed predecessor held (was one a message).
    assert queue_writes.count == 1


def test_a_bus_worker_outlives_a_failed_ack(bus_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue refusing one ack leaves the message queued for another go, and the worker
    (the function's only one) goes on to handle what comes next."""
    monkeypatch.setattr("events.bus.POLL_SECONDS", 0.05)
    bus = InProcessBus(RetryPolicy((0.05,)), bus_db, concurrency=1, exclusive=True)
    handled: list[str] = []
    bus.subscribe(Subscription("storage", lambda e: handled.append(str(e["id"]))))
    refusals = _refuse_once(monkeypatch, bus.queue, "delete_one")
    first, second = _event(), _event()
    bus.start()
    try:
        bus.publish(first)
        wait_for(lambda: not refusals, timeout=10, what="the refused ack")
        bus.publish(second)
        assert bus.wait_idle(10)
    finally:
        bus.stop()
    # The first event was handled again after its ack failed (handlers are idempotent).
    assert handled == [str(first["id"]), str(first["id"]), str(second["id"])]


def test_a_dead_lettering_cut_short_is_finished_not_repeated(
    bus_db: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dead letter is written but the queue refuses to let the message go (or the
    process dies in between): the next go finds the dead letter and only takes the message
    off the queue, instead of failing on the dead letter's id for ever."""
    monkeypatch.setattr("events.bus.POLL_SECONDS", 0.05)
    bus = InProcessBus(RetryPolicy(()), bus_db, concurrency=1, exclusive=True)
    calls: list[str] = []

    def failing(event: CloudEvent) -> None:
        calls.append(str(event["id"]))
        raise RuntimeError("unreadable")

    bus.subscribe(Subscription("storage", failing))
    refusals = _refuse_once(monkeypatch, bus.queue, "delete_one")
    event = _event()
    bus.start()
    try:
        bus.publish(event)
        wait_for(lambda: not refusals, timeout=10, what="the refused removal")
        assert bus.wait_idle(10)
    finally:
        bus.stop()
    assert calls == [str(event["id"])] * 2  # the second go finished what the first began
    [dead] = bus.dead_letters("storage")
    assert dead["reason"] == "RuntimeError: unreadable"
    assert bus.queue.count_documents({}) == 0


def _refuse_once(monkeypatch: pytest.MonkeyPatch, collection: Any, method: str,
                 ) -> list[Exception]:
    """Make the collection's next ``method`` call fail, as a database refusing one write
    would; the returned list is empty once it has."""
    real = getattr(collection, method)
    refusals: list[Exception] = [RuntimeError("write refused")]

    def refuse_once(*args: Any, **kwargs: Any) -> Any:
        if refusals:
            raise refusals.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(collection, method, refuse_once)
    return refusals


@pytest.mark.parametrize("outcome", ["handled", "failed", "failed-for-good"])
def test_a_worker_whose_lease_was_taken_over_settles_nothing(bus_db: Any, outcome: str) -> None:
    """Buses of several processes on one database lease what they take. A handler that
    outlasts its lease finds the event taken over by another worker: its ack (or retry) must
    not remove (or reset) the message the other worker now holds."""
    bus = InProcessBus(RetryPolicy(() if outcome == "failed-for-good" else (0.05,)), bus_db,
                       concurrency=1)
    someone_else = datetime(2100, 1, 1, tzinfo=UTC)

    def outlasts_its_lease(event: CloudEvent) -> None:
        # meanwhile the lease ran out, and another process's worker took the message
        bus_db["bus_messages"].update_one({"event_id": event["id"]},
                                          {"$set": {"lease_until": someone_else}})
        if outcome != "handled":
            raise RuntimeError("too slow")

    bus.subscribe(Subscription("storage", outlasts_its_lease))
    event = _event()
    bus.publish(event)
    message = bus._claim("storage")
    assert message is not None
    bus._run(bus._subs["storage"], message)
    [left] = bus_db["bus_messages"].find({"event_id": event["id"]})
    assert left["lease_until"].replace(tzinfo=UTC) == someone_else
    assert left["attempt"] == 1
    assert bus.dead_letters("storage") == []
