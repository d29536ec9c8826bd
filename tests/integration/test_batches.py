"""Events handled in batches: the RabbitMQ runner hands a backlog to a function several
events at a time, each settled by its own outcome, and the storage and notification
functions share their database round trips among a batch without changing what each event
does (stored once, pushed once, a failure retried alone)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import pika
import pymongo
import pytest
import requests
from cloudevents.http import CloudEvent
from pymongo import monitoring

from events import amqp_codec, topology
from events.catalog import DOCUMENT_STORED, DOCUMENT_UPLOADED, DocumentUploaded
from events.cloudevent import MalformedEvent, make_event
from events.publisher import AmqpPublisher
from events.runner import RabbitRunner
from events.subscriptions import BatchHandler, RetryPolicy, Subscription
from functions.notification.main import handle_batch as notify_batch
from functions.storage.main import handle_batch as store_batch
from shared.config import Settings
from shared.deliveries import DeliveryRepository, device_key
from shared.documents import DocumentRepository, Status
from shared.ids import new_document_id
from tests import samples
from tests.conftest import Running, serving
from tests.fcm_stub import FcmStub
from tests.helpers import Commands, register_device, upload, wait_for

pytestmark = pytest.mark.services


def _uploaded(doc_id: str) -> CloudEvent:
    return make_event(
        DOCUMENT_UPLOADED, "/tests", doc_id,
        DocumentUploaded(document_id=doc_id, owner="driver-1", filename="x.pdf",
                         declared_type="application/pdf", size=10, sha256="0" * 64),
    )


@contextmanager
def _one_thread(settings: Settings, one: Callable[[CloudEvent], None],
                many: BatchHandler, url: str | None = None,
                ) -> Iterator[tuple[RabbitRunner, AmqpPublisher, threading.Thread]]:
    """A storage runner with one handler thread taking up to four events (connected to
    ``url``, else to the settings' broker), and a publisher."""
    runner = RabbitRunner(url or settings.amqp_url or "", settings.amqp_prefix,
                          Subscription("storage", one, many),
                          RetryPolicy(settings.retry_delays), concurrency=1, batch_size=4)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    publisher = AmqpPublisher(settings.amqp_url or "", settings.amqp_prefix,
                              settings.retry_delays)
    try:
        assert runner.ready.wait(10)
        yield runner, publisher, thread
    finally:
        publisher.close()
        runner.stop()
        thread.join(10)


def test_a_backlog_is_handed_over_in_batches_each_event_settled_alone(
    service_settings: Callable[..., Settings],
) -> None:
    settings = service_settings()
    gate = threading.Event()
    lock = threading.Lock()
    calls: list[list[str]] = []
    handled: list[str] = []
    failing: set[str] = set()  # fail once, in whatever batch they come

    def one(event: CloudEvent) -> None:
        with lock:
            calls.append([str(event["id"])])
        gate.wait(10)  # hold the only thread while the backlog builds up
        with lock:
            handled.append(str(event["id"]))

    def many(events: Sequence[CloudEvent]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        with lock:
            calls.append([str(e["id"]) for e in events])
            for event in events:
                if str(event["id"]) in failing:
                    failing.discard(str(event["id"]))
                    outcomes.append(ConnectionError("briefly unreachable"))
                else:
                    handled.append(str(event["id"]))
                    outcomes.append(None)
        return outcomes

    with _one_thread(settings, one, many) as (runner, publisher, _):
        events = [_uploaded(new_document_id()) for _ in range(9)]
        ids = [str(e["id"]) for e in events]
        failing.add(ids[2])
        publisher.publish(events[0])
        wait_for(lambda: calls, what="the first event to be taken")
        for event in events[1:]:
            publisher.publish(event)
        # The prefetch (concurrency x batch) lets three more wait while the thread is held.
        wait_for(lambda: runner.waiting() >= 3 or None, what="the backlog to arrive")
        gate.set()
        wait_for(lambda: len(handled) == 9 or None, what="every event to be handled")
        assert sorted(handled) == sorted(ids)  # each once, the failed one after its retry
        assert calls[0] == [ids[0]]
        assert calls[1] == ids[1:4]  # what waited, in one call
        assert max(len(c) for c in calls) <= 4
        assert sum(c.count(ids[2]) for c in calls) == 2  # failed in its batch, retried alone
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        chan = conn.channel()
        dead = chan.queue_declare(topology.dead_letter_queue(settings.amqp_prefix, "storage"),
                                  passive=True)
        left = chan.queue_declare(topology.queue(settings.amqp_prefix, "storage"),
                                  passive=True)
        assert (dead.method.message_count, left.method.message_count) == (0, 0)
    finally:
        conn.close()


def test_a_stopping_runner_leaves_what_waits_to_the_broker(
    service_settings: Callable[..., Settings],
) -> None:
    settings = service_settings()
    gate = threading.Event()
    handled: list[str] = []

    def one(event: CloudEvent) -> None:
        gate.wait(10)
        handled.append(str(event["id"]))

    def many(events: Sequence[CloudEvent]) -> list[BaseException | None]:
        handled.extend(str(e["id"]) for e in events)
        return [None] * len(events)

    with _one_thread(settings, one, many) as (runner, publisher, thread):
        for _ in range(4):
            publisher.publish(_uploaded(new_document_id()))
        wait_for(lambda: runner.waiting() >= 3 or None, what="three events to wait")
        runner.stop()
        gate.set()
        thread.join(10)
        assert not thread.is_alive()
    assert len(handled) == 1  # the one in hand is finished; the waiting ones are not taken
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        queue = topology.queue(settings.amqp_prefix, "storage")
        left = conn.channel().queue_declare(queue, passive=True).method.message_count
        # The waiting three are back in the queue for the next consumer; so is the one in
        # hand if the connection had closed before its ack went out (handlers are idempotent).
        assert left in (3, 4)
    finally:
        conn.close()


def _take(settings: Settings, function: str, count: int) -> list[CloudEvent]:
    """The events waiting in a function's queue (nobody consumes it in these tests)."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    taken: list[CloudEvent] = []
    try:
        chan = conn.channel()
        queue = topology.queue(settings.amqp_prefix, function)

        def fetch() -> bool | None:
            method, props, body = chan.basic_get(queue, auto_ack=True)
            if method is not None:
                taken.append(amqp_codec.decode(props, body))
            return True if len(taken) >= count else None

        wait_for(fetch, what=f"{count} events in {queue}")
    finally:
        conn.close()
    return taken


class _Finishes(Commands):
    """The statements of each write that moves documents out of `processing`."""

    def __init__(self) -> None:
        super().__init__("update", "documents")
        self.statements: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update" and event.command.get("update") == "documents":
            finishing = [u for u in event.command.get("updates", []) if "status" in u["q"]]
            if finishing:
                self.statements.append(len(finishing))


class _RecordReads(Commands):
    """Reads of documents by id (the outbox relay's polling, which shares the repository,
    looks by due time and is left out)."""

    def __init__(self) -> None:
        super().__init__("find", "documents")

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if (event.command_name == "find" and event.command.get("find") == "documents"
                and "_id" in event.command.get("filter", {})):
            self.count += 1


@contextmanager
def _counted(running: Running, *commands: Commands) -> Iterator[None]:
    """The pipeline's repositories on a client that counts the commands it sends."""
    svc = running.svc
    settings = svc.settings
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        settings.mongodb_uri, tz_aware=True, event_listeners=list(commands))
    db = client[settings.mongodb_database]
    documents, deliveries = svc.documents, svc.deliveries
    svc.documents, svc.deliveries = DocumentRepository(db), DeliveryRepository(db)
    try:
        yield
    finally:
        svc.documents, svc.deliveries = documents, deliveries
        client.close()


@pytest.fixture
def idle(service_settings: Callable[..., Settings]) -> Iterator[Running]:
    """The pipeline answering HTTP and publishing, with no function consuming the events."""
    with serving(service_settings, consumers=False) as run:
        yield run


def test_storage_and_notification_batches_share_their_round_trips(
    idle: Running, http: requests.Session, fcm: FcmStub,
) -> None:
    register_device(http, idle.base_url, "phone-batch")
    bodies = [samples.pdf(samples.marker()) for _ in range(3)]
    ids = [upload(http, idle.base_url, body, "application/pdf").json()["id"]
           for body in bodies]
    uploaded = _take(idle.svc.settings, "storage", 3)
    assert sorted(str(e["subject"]) for e in uploaded) == sorted(ids)
    missing = _uploaded(new_document_id())  # withdrawn before it was acknowledged
    wrong = CloudEvent({"type": DOCUMENT_STORED, "source": "/tests", "id": "wrong-1",
                        "subject": ids[0], "specversion": "1.0"}, uploaded[0].get_data())
    batch = [uploaded[0], uploaded[1], wrong, uploaded[2], uploaded[0], missing]

    finds = _RecordReads()
    outcomes_written = _Finishes()
    with _counted(idle, finds, outcomes_written):
        outcomes = store_batch(idle.svc, batch)
    assert [type(o).__name__ if o else None for o in outcomes] == [
        None, None, MalformedEvent.__name__, None, None, None]
    # One query for the batch, one more for the duplicate, which goes after it; the three
    # outcomes in one write.
    assert finds.count == 2
    assert outcomes_written.statements == [3]
    for doc_id in ids:
        record = idle.svc.documents.get(doc_id)
        assert record is not None
        assert record.status == Status.STORED
    assert idle.svc.documents.get(str(missing["subject"])) is None

    # Each document announced once, and the duplicate's outcome again (the same event id).
    stored = _take(idle.svc.settings, "notification", 4)
    assert sorted(str(e["id"]) for e in stored) == sorted(
        [f"{d}.stored" for d in ids] + [f"{ids[0]}.stored"])
    inserts = Commands("insert", "deliveries")
    updates = Commands("update", "deliveries")
    with _counted(idle, inserts, updates):
        assert notify_batch(idle.svc, stored) == [None] * 4
        assert notify_batch(idle.svc, stored[:3]) == [None] * 3  # redelivered: nothing sent
    # A batch's claims in one insert and its completions in one update. The duplicate within
    # the first batch goes after it (an insert, then the update that finds it completed), as
    # every event of the second batch does after their one insert.
    assert (inserts.count, updates.count) == (1 + 1 + 1, 1 + 1 + 3)
    # A batch with nothing to claim or record: each event still gets its own outcome.
    wrong_type = CloudEvent({"type": DOCUMENT_UPLOADED, "source": "/tests", "id": "wrong-2",
                             "subject": ids[1], "specversion": "1.0"}, uploaded[1].get_data())
    assert [type(o).__name__ for o in notify_batch(idle.svc, [wrong_type, wrong_type])] == [
        MalformedEvent.__name__] * 2
    assert store_batch(idle.svc, [_uploaded(new_document_id()), _uploaded(new_document_id())]
                       ) == [None, None]
    pushes = fcm.messages_for("phone-batch")
    assert sorted(p["data"]["document_id"] for p in pushes) == sorted(ids)
    for doc_id in ids:
        delivery = idle.svc.deliveries.get(f"{doc_id}.stored")
        assert delivery is not None
        assert delivery["state"] == "completed"
        assert [s["device"] for s in delivery["sent"]] == [device_key("phone-batch")]


def test_a_batch_whose_outcomes_cannot_be_written_retries_each_with_the_real_reason(
    idle: Running, http: requests.Session,
) -> None:
    from pymongo.errors import AutoReconnect

    ids = [upload(http, idle.base_url, samples.pdf(samples.marker()), "application/pdf")
           .json()["id"] for _ in range(2)]
    uploaded = _take(idle.svc.settings, "storage", 2)
    wrong = CloudEvent({"type": DOCUMENT_STORED, "source": "/tests", "id": "wrong-3",
                        "subject": ids[0], "specversion": "1.0"}, uploaded[0].get_data())
    repo = idle.svc.documents

    def unreachable(outcomes: Any) -> Any:
        raise AutoReconnect("the database went away")

    repo.finish_many = unreachable
    try:
        outcomes = store_batch(idle.svc, [uploaded[0], wrong, uploaded[1]])
    finally:
        del repo.finish_many
    # Each event keeps its own reason: the database's for the two to retry, and the
    # malformed one is still dead-lettered as malformed.
    assert [type(o).__name__ for o in outcomes] == [
        "AutoReconnect", MalformedEvent.__name__, "AutoReconnect"]
    assert "the database went away" in str(outcomes[0])
    assert [repo.col.find_one({"_id": d})["status"] for d in ids] == ["processing"] * 2
    # retried, they are stored
    assert store_batch(idle.svc, [uploaded[0], uploaded[1]]) == [None, None]
    assert [repo.col.find_one({"_id": d})["status"] for d in ids] == ["stored"] * 2


def test_a_batch_renews_a_lease_that_would_not_outlast_its_send(
    idle: Running, http: requests.Session, fcm: FcmStub, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claims of a batch are taken together and its sends go one after another: an
    event whose lease has less left than a send may take is renewed before it sends."""
    import functions.notification.main as notification

    register_device(http, idle.base_url, "phone-lease")
    ids = [upload(http, idle.base_url, samples.pdf(samples.marker()), "application/pdf")
           .json()["id"] for _ in range(2)]
    assert store_batch(idle.svc, _take(idle.svc.settings, "storage", 2)) == [None, None]
    stored = _take(idle.svc.settings, "notification", 2)
    # Leases a little shorter than a send's worst case: every send must renew first.
    monkeypatch.setattr(notification, "LEASE_MARGIN_SECONDS", -1.0)
    updates = Commands("update", "deliveries")
    with _counted(idle, updates):
        assert notify_batch(idle.svc, stored) == [None, None]
    assert updates.count == 2 + 1  # a renewal per send, then the completions together
    pushes = fcm.messages_for("phone-lease")
    assert sorted(p["data"]["document_id"] for p in pushes) == sorted(ids)


class _Cuttable:
    """A TCP relay on loopback to the broker whose connections can be cut, as a network
    failure would: the runner behind it loses its connection and makes a new one."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket

        self._upstream = upstream
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        import socket

        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        self._listener.close()


def test_what_waits_on_a_lost_connection_is_left_to_the_broker(
    service_settings: Callable[..., Settings],
) -> None:
    """Events delivered on a connection that is then lost are handed out again by the
    broker: the handler threads finish what they hold and take none of the rest, which
    would otherwise be handled twice at once (here, and by whoever gets it next)."""
    from urllib.parse import urlsplit, urlunsplit

    settings = service_settings()
    broker = urlsplit(settings.amqp_url or "")
    relay = _Cuttable((broker.hostname or "127.0.0.1", broker.port or 5672))
    via_relay = urlunsplit(broker._replace(
        netloc=f"{broker.username}:{broker.password}@127.0.0.1:{relay.port}"))
    gate = threading.Event()
    lock = threading.Lock()
    handled: list[str] = []

    def one(event: CloudEvent) -> None:
        if not gate.is_set():
            gate.wait(10)  # held while the rest waits and the connection goes
        with lock:
            handled.append(str(event["id"]))

    def many(events: Sequence[CloudEvent]) -> list[BaseException | None]:
        with lock:
            handled.extend(str(e["id"]) for e in events)
        return [None] * len(events)

    try:
        with _one_thread(settings, one, many, url=via_relay) as (runner, publisher, _):
            events = [_uploaded(new_document_id()) for _ in range(4)]
            ids = [str(e["id"]) for e in events]
            publisher.publish(events[0])
            wait_for(lambda: runner.waiting() == 0 or None, what="the first event to be taken")
            for event in events[1:]:
                publisher.publish(event)
            wait_for(lambda: runner.waiting() >= 3 or None, what="the rest to wait")
            relay.cut()
            time.sleep(0.5)  # the connection's loss is seen
            gate.set()
            wait_for(lambda: sorted(set(handled)) == sorted(ids) or None, timeout=20,
                     what="every event after the reconnection")
            time.sleep(0.5)
            # The one in hand was handled, and again once redelivered; the three that
            # waited, once each, after the reconnection.
            assert sorted(handled) == sorted([ids[0], *ids])
    finally:
        gate.set()
        relay.close()
