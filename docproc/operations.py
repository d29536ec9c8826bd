"""What the people running docproc do: dead letters, reprocessing, key rotation.

Each works the same on RabbitMQ and on the embedded installation (whose database a running
``docproc serve`` shares through its wire address)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pika
from cloudevents.http import CloudEvent

from docproc.runtime import NoTransport, Services
from events import amqp_codec, topology
from events.bus import DEAD, QUEUE
from events.catalog import DOCUMENT_UPLOADED, DocumentUploaded
from events.cloudevent import make_event
from events.publisher import PublishError
from events.runner import ATTEMPT_HEADER, DEAD_REASON_HEADER
from events.subscriptions import ROUTES
from shared.documents import Document, Status
from shared.keys import KeyProvider, KeyProviderError, WrappedKey
from shared.knative_dead_letters import COLLECTION as KNATIVE_DEAD_LETTERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    function: str
    reason: str
    attempts: int
    event: dict[str, Any]

    @property
    def summary(self) -> str:
        return (f"{self.id}  {self.event.get('type')}  subject={self.event.get('subject')}  "
                f"attempts={self.attempts}  reason={self.reason}")


class DeadLetters(Protocol):
    def list(self, fn: str) -> list[DeadLetter]: ...
    def replay(self, fn: str, ids: set[str] | None) -> int: ...
    def purge(self, fn: str, ids: set[str] | None) -> int: ...


def dead_letters(svc: Services) -> DeadLetters:
    if svc.settings.amqp_url:
        return RabbitDeadLetters(svc.settings.amqp_url, svc.settings.amqp_prefix)
    if svc.settings.k_sink:
        # Deployed on Knative: its Triggers dead-letter into the sink's collection.
        return KnativeDeadLetters(svc)
    return EmbeddedDeadLetters(svc)


class RabbitDeadLetters:
    """Reads `<prefix>.<fn>.dlq` by getting messages unacknowledged (so they return to the
    queue when the channel closes); replay re-queues to the function's queue, confirmed,
    before the dead letter is acked."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix

    def _browse(self, fn: str) -> Iterator[tuple[Any, Any, pika.BasicProperties, bytes]]:
        """The letters in the queue when the browse starts, each once: a letter replayed
        now that fails again comes back behind them, to be replayed (or not) another time,
        not over and over within this one."""
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            chan = conn.channel()
            chan.confirm_delivery()
            name = topology.dead_letter_queue(self.prefix, fn)
            present = chan.queue_declare(name, passive=True).method.message_count
            for _ in range(present):
                method, props, body = chan.basic_get(name, auto_ack=False)
                if method is None:
                    break
                yield chan, method, props, body
        finally:
            conn.close()

    @staticmethod
    def _letter(fn: str, props: pika.BasicProperties, body: bytes) -> DeadLetter:
        headers = props.headers or {}
        event = {**amqp_codec.attributes(headers)}
        try:
            event["data"] = json.loads(body)
        except ValueError:
            event["data"] = body.decode(errors="replace")
        # Dead-lettered by RabbitMQ itself (delivery limit): its x-death header says why.
        reason = headers.get(DEAD_REASON_HEADER) or (
            f"rabbitmq: {headers['x-first-death-reason']} (a consumer died on it "
            "every time it was delivered)" if "x-first-death-reason" in headers else "")
        return DeadLetter(id=str(props.message_id or event.get("id")), function=fn,
                          reason=str(reason),
                          attempts=int(headers.get(ATTEMPT_HEADER, 1)), event=event)

    def list(self, fn: str) -> list[DeadLetter]:
        return [self._letter(fn, p, b) for _, _, p, b in self._browse(fn)]

    def replay(self, fn: str, ids: set[str] | None) -> int:
        done = 0
        for chan, method, props, body in self._browse(fn):
            if ids is not None and props.message_id not in ids:
                continue
            headers = {k: v for k, v in (props.headers or {}).items()
                       if not k.startswith("x-docproc-")}
            fresh = pika.BasicProperties(content_type=props.content_type, headers=headers,
                                         delivery_mode=pika.DeliveryMode.Persistent,
                                         message_id=props.message_id, type=props.type)
            chan.basic_publish("", topology.queue(self.prefix, fn), body, fresh, mandatory=True)
            chan.basic_ack(method.delivery_tag)
            done += 1
        return done

    def purge(self, fn: str, ids: set[str] | None) -> int:
        done = 0
        for chan, method, props, _ in self._browse(fn):
            if ids is None or props.message_id in ids:
                chan.basic_ack(method.delivery_tag)
                done += 1
        return done


class EmbeddedDeadLetters:
    def __init__(self, svc: Services) -> None:
        self.dead = svc.mongo.db[DEAD]
        self.queue = svc.mongo.db[QUEUE]

    def _find(self, fn: str, ids: set[str] | None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"fn": fn}
        if ids is not None:
            query["$or"] = [{"_id": {"$in": list(ids)}}, {"event_id": {"$in": list(ids)}}]
        return list(self.dead.find(query).sort("at", 1))

    def list(self, fn: str) -> list[DeadLetter]:
        return [DeadLetter(id=str(r.get("event_id") or r["_id"]), function=fn,
                           reason=r["reason"], attempts=int(r["attempts"]),
                           event=json.loads(r["event"]))
                for r in self._find(fn, None)]

    def replay(self, fn: str, ids: set[str] | None) -> int:
        done = 0
        for row in self._find(fn, ids):
            now = datetime.now(UTC)
            # Queued under a new id: if it fails again before its old letter is removed,
            # its new letter must not collide with (and be taken for) the old one.
            self.queue.insert_one({"_id": uuid.uuid4().hex, "fn": fn, "event": row["event"],
                                   "attempt": 1, "due_at": now, "lease_until": None,
                                   "event_id": row.get("event_id"), "created_at": now})
            self.dead.delete_one({"_id": row["_id"]})
            done += 1
        return done

    def purge(self, fn: str, ids: set[str] | None) -> int:
        rows = self._find(fn, ids)
        if rows:
            self.dead.delete_many({"_id": {"$in": [r["_id"] for r in rows]}})
        return len(rows)


class KnativeDeadLetters:
    """What Knative's Triggers gave up on, as the dead-letter sink recorded it
    (shared/knative_dead_letters.py). The sink keeps the event's attributes, not its data,
    so a replay sends the document through storage again (as `docproc reprocess` does):
    storage stores a document still `processing` and announces a finished one again, with
    its original event id, which also redoes a lost notification; the notification's
    delivery record keeps devices that already had it from a second push."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.col = svc.mongo.db[KNATIVE_DEAD_LETTERS]

    def _find(self, fn: str, ids: set[str] | None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"function": fn}
        if ids is not None:
            query["_id"] = {"$in": sorted(f"{fn}:{i}" for i in ids)}
        return list(self.col.find(query).sort("first_at", 1))

    def list(self, fn: str) -> list[DeadLetter]:
        return [DeadLetter(id=str(r["event"].get("id", r["_id"])), function=fn,
                           reason=f"Knative {r.get('error_code') or '?'} from "
                                  f"{r.get('error_destination') or '?'}: {r.get('error') or ''}",
                           attempts=int(r.get("deliveries", 1)), event=r["event"])
                for r in self._find(fn, None)]

    def replay(self, fn: str, ids: set[str] | None) -> int:
        done = 0
        for row in self._find(fn, ids):
            subject = row["event"].get("subject")
            doc = self.svc.documents.get(subject) if subject else None
            if doc is None or doc.status == Status.DELETED:
                # Nothing to send again: the letter stays for an operator to purge.
                log.warning("dead letter %s: document %s is gone; not replayed", row["_id"],
                            subject)
                continue
            self.svc.publish(uploaded_event(self.svc, doc))
            # Only the letter as read: one the replayed event earned by failing again
            # meanwhile (the same id, counted up) stays, or it would be lost.
            self.col.delete_one({"_id": row["_id"], "deliveries": row.get("deliveries"),
                                 "last_at": row.get("last_at")})
            done += 1
        return done

    def purge(self, fn: str, ids: set[str] | None) -> int:
        return self.col.delete_many({"_id": {"$in": [r["_id"] for r in self._find(fn, ids)]}}
                                    ).deleted_count


def check_function(fn: str) -> str:
    if fn not in ROUTES:
        raise ValueError(f"no event function {fn!r}; choose one of {', '.join(ROUTES)}")
    return fn


def uploaded_event(svc: Services, doc: Document) -> CloudEvent:
    """The document's original document.uploaded event, with its original id."""
    return make_event(
        DOCUMENT_UPLOADED, svc.settings.event_source, doc.id,
        DocumentUploaded(document_id=doc.id, owner=doc.owner, filename=doc.filename,
                         declared_type=doc.declared_type, size=doc.size, sha256=doc.sha256),
        event_id=doc.upload_event_id,
    )


# Stuck documents sent again per run: they stay `processing` until storage has them, so a
# run cannot page past them; another run takes the next ones.
REPROCESS_BATCH = 1000


class ReprocessInterrupted(Exception):
    """Publishing failed partway: ``done`` were sent, ``left`` were not."""

    def __init__(self, done: list[str], left: list[str], error: Exception) -> None:
        super().__init__(f"stopped after sending {len(done)} of {len(done) + len(left)} "
                         f"document(s): {error}")
        self.done = done
        self.left = left


def reprocess(svc: Services, ids: list[str] | None = None,
              older_than: timedelta | None = None) -> list[str]:
    """Send documents through storage again. Handlers are idempotent: a stuck document is
    processed, a finished one is only announced again. Without ids, at most
    REPROCESS_BATCH of the oldest stuck documents. Raises ReprocessInterrupted, saying what
    was sent, when an event cannot be published."""
    if ids:
        docs = [d for d in (svc.documents.get(i) for i in ids) if d is not None]
        missing = set(ids) - {d.id for d in docs}
        if missing:
            raise LookupError(f"no such document: {', '.join(sorted(missing))}")
    else:
        age = older_than if older_than is not None else timedelta(minutes=10)
        cutoff = datetime.now(UTC) - age
        docs = svc.documents.stuck(cutoff, limit=REPROCESS_BATCH)
    todo = [doc for doc in docs if doc.status != Status.DELETED]
    done: list[str] = []
    for doc in todo:
        try:
            svc.publish(uploaded_event(svc, doc))
        except (PublishError, NoTransport) as exc:
            raise ReprocessInterrupted(done, [d.id for d in todo[len(done):]], exc) from exc
        done.append(doc.id)
    return done


@dataclass
class RotationReport:
    new_key_id: str
    rewrapped: int
    already_current: int
    shredded: int
    # Changed by someone else between our read and our write (deleted, re-wrapped): the
    # next run sees what they left.
    changed: int = 0
    # Documents whose data key could not be re-wrapped, with why: they stay as they were.
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = (f"active key {self.new_key_id}: {self.rewrapped} data key(s) re-wrapped, "
                f"{self.already_current} already under it, {self.shredded} deleted documents "
                f"skipped, {self.changed} changed meanwhile")
        for doc_id, why in sorted(self.failed.items()):
            text += f"\n  NOT re-wrapped: {doc_id}: {why}"
        return text


def rewrap_all(svc: Services, provider: KeyProvider,
               progress: Callable[[int, int], None] | None = None) -> RotationReport:
    """Re-wrap every document's data key under ``provider``'s active key. Documents stay as
    they are; an interrupted run is simply run again (keys already re-wrapped are skipped)."""
    active = provider.active_key_id()
    col = svc.documents.col
    total = col.count_documents({})
    report = RotationReport(active, 0, 0, 0)
    for seen, raw in enumerate(col.find({}, {"wrapped_key": 1}).sort("_id", 1), start=1):
        wrapped_doc = raw.get("wrapped_key")
        if wrapped_doc is None:
            report.shredded += 1
        else:
            old = WrappedKey.from_doc(wrapped_doc)
            try:
                new = provider.rewrap(old, {"document_id": raw["_id"]})
            except KeyProviderError as exc:
                # One key that cannot be unwrapped (its KEK gone, another provider's) does
                # not stop the others; the run reports it and fails.
                report.failed[str(raw["_id"])] = str(exc)
            else:
                if new is old or new.key_id == old.key_id:
                    report.already_current += 1
                # Only replace the exact key we read: a concurrent delete stays a delete.
                elif col.update_one({"_id": raw["_id"], "wrapped_key": wrapped_doc},
                                    {"$set": {"wrapped_key": new.to_doc()}}).modified_count:
                    report.rewrapped += 1
                else:
                    report.changed += 1
        if progress is not None and (seen % 500 == 0 or seen == total):
            progress(seen, total)
    return report


def parse_age(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"{text!r} is not an age like 90s, 10m, 2h or 1d")
    return timedelta(seconds=int(text[:-1]) * units[text[-1]])
