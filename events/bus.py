"""The embedded event bus: RabbitMQ's semantics for one installation with no broker.

Messages live in the MongoDB database (the embedded SecantusDB, durable on disk), one per
subscribed function, so an event accepted before a crash is still there after a restart.
A worker leases a message (in memory when this process alone uses the database, as the
embedded default does; in the record otherwise), runs the handler and deletes it (the
ack); a failed message waits out the same backoff delays as on RabbitMQ and after the last
attempt moves to the dead letters with its reason. Workers in this process are woken at
once on publish; otherwise they poll, which also picks up retries that have come due.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudevents.conversion import to_json
from cloudevents.http import CloudEvent, from_json
from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from events.cloudevent import handling
from events.publisher import PublishError
from events.subscriptions import ROUTES, RetryPolicy, Subscription, describe
from shared.observability import DEAD_LETTERS, HANDLED, RETRIES

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=120)
POLL_SECONDS = 0.5
QUEUE = "bus_messages"
DEAD = "bus_dead_letters"


def _now() -> datetime:
    return datetime.now(UTC)


def _whole_ms(moment: datetime) -> datetime:
    """``moment`` as the database keeps it (BSON dates are milliseconds)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _held(message: dict[str, Any]) -> dict[str, Any]:
    """The message while it is still ours: a worker whose lease ran out and was taken over
    settles nothing (the handlers are idempotent; the new holder settles it)."""
    return {"_id": message["_id"], "lease_until": message.get("lease_until")}


class InProcessBus:
    def __init__(self, policy: RetryPolicy, db: Database[dict[str, Any]],
                 concurrency: int = 2, *, exclusive: bool = False) -> None:
        """``exclusive``: this process alone uses the database (the embedded one), so leases
        left by a killed predecessor can be released at start instead of waited out."""
        self.policy = policy
        self.queue = db[QUEUE]
        self.dead = db[DEAD]
        self.concurrency = concurrency
        self.exclusive = exclusive
        self._subs: dict[str, Subscription] = {}
        # One wake-up per queued message, for the workers of the function it is for: waking
        # every worker of every function on each publish cost each of them a query.
        self._lock = threading.Lock()
        self._ready: dict[str, threading.Condition] = {}
        self._signals: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._busy = 0
        # Exclusive: the messages this process's workers hold, per function. No other process
        # can take one, so the lease lives here instead of in a write to the queue per
        # message. A function's look at the queue and the take are one step under its lock,
        # and so is the release after the ack, so a look that raced an ack cannot hand out
        # the message that was just deleted.
        self._taken: dict[str, set[str]] = {}
        self._claiming: dict[str, threading.Lock] = {}

    def subscribe(self, sub: Subscription) -> None:
        self._subs[sub.name] = sub
        self._ready[sub.name] = threading.Condition(self._lock)
        self._signals[sub.name] = 0
        self._taken[sub.name] = set()
        self._claiming[sub.name] = threading.Lock()

    def start(self) -> None:
        self.queue.create_index([("fn", ASCENDING), ("due_at", ASCENDING)], name="fn_due")
        self.dead.create_index([("fn", ASCENDING), ("at", ASCENDING)], name="fn_at")
        if self.exclusive:
            self.queue.update_many({}, {"$set": {"lease_until": None}})
        for name in self._subs:
            for i in range(self.concurrency):
                t = threading.Thread(target=self._worker, args=(name,), daemon=True,
                                     name=f"bus-{name}-{i}")
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            for ready in self._ready.values():
                ready.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def close(self) -> None:
        self.stop()

    def publish(self, event: CloudEvent) -> None:
        # The routing table, not this process's subscriptions, decides: a process that only
        # publishes (a CLI command) queues for the workers of another.
        targets = [fn for fn, types in ROUTES.items() if event["type"] in types]
        if not targets:
            # RabbitMQ's mandatory flag would refuse it too: nobody would ever see it.
            raise PublishError(f"no subscriber for {event['type']}")
        payload = to_json(event).decode()
        now = _now()
        try:
            self.queue.insert_many([
                {"_id": uuid.uuid4().hex, "fn": name, "event": payload, "attempt": 1,
                 "due_at": now, "lease_until": None, "event_id": str(event["id"]),
                 "created_at": now}
                for name in targets
            ])
        except Exception as exc:  # the database is the broker here
            raise PublishError(f"could not queue event {event['id']}: {exc}") from exc
        with self._lock:
            for name in targets:
                if name in self._ready:
                    # Counted, so a worker between an empty look and its wait still sees it;
                    # capped, so a burst does not make idle workers look again and again.
                    self._signals[name] = min(self._signals[name] + 1, self.concurrency)
                    self._ready[name].notify()

    def pending(self) -> int:
        return self.queue.count_documents({})

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once no event is queued, running or waiting for a retry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._busy == 0 and self.pending() == 0:
                return True
            time.sleep(0.05)
        return False

    def _claim(self, name: str) -> dict[str, Any] | None:
        if self.exclusive:
            return self._claim_here(name)
        now = _now()
        candidates = self.queue.find({"fn": name, "due_at": {"$lte": now}}).sort(
            "due_at", ASCENDING).limit(self.concurrency * 2)
        for message in candidates:
            lease = message.get("lease_until")
            if lease is not None and lease >= now:
                continue  # another worker has it
            # Taken only if nobody leased, failed or retried it since we read it (update_one,
            # as find_one_and_update costs SecantusDB time in proportion to the collection):
            # a stale copy would run before its backoff, with an attempt count gone back.
            held = _whole_ms(now + LEASE)  # as stored, so that it can be matched later
            taken = self.queue.update_one(
                {"_id": message["_id"], "lease_until": lease, "attempt": message["attempt"],
                 "due_at": message["due_at"]},
                {"$set": {"lease_until": held}})
            if taken.modified_count == 1:
                message["lease_until"] = held
                return message
        return None

    def _claim_here(self, name: str) -> dict[str, Any] | None:
        taken = self._taken[name]
        with self._claiming[name]:
            for message in self.queue.find({"fn": name, "due_at": {"$lte": _now()}}).sort(
                    "due_at", ASCENDING).limit(self.concurrency * 2):
                if message["_id"] not in taken:
                    taken.add(message["_id"])
                    return message
        return None

    def _worker(self, name: str) -> None:
        sub = self._subs[name]
        while not self._stopping:
            try:
                message = self._claim(name)
            except Exception as exc:
                log.warning("bus: cannot read the queue (%s); retrying", exc)
                message = None
            if message is None:
                with self._lock:
                    if not self._stopping and self._signals[name] == 0:
                        self._ready[name].wait_for(
                            lambda: self._stopping or self._signals[name] > 0, POLL_SECONDS)
                    if self._signals[name] > 0:
                        self._signals[name] -= 1
                continue
            self._busy += 1
            try:
                self._run(sub, message)
            except Exception as exc:
                # Not the handler (_run settles its failures) but the queue: the ack or the
                # retry could not be written. The message stays and is taken again; the
                # worker lives on instead of leaving the function one worker short for good.
                log.warning("bus: could not settle a %s message (%s); it stays queued", name,
                            exc)
                time.sleep(POLL_SECONDS)
            finally:
                self._busy -= 1
                if self.exclusive:
                    with self._claiming[name]:
                        self._taken[name].discard(message["_id"])

    def _run(self, sub: Subscription, message: dict[str, Any]) -> None:
        try:
            event = from_json(message["event"])
            with handling(event, sub.name):
                sub.handler(event)
        except Exception as exc:
            HANDLED.labels(sub.name, "failed").inc()
            self._failed(sub.name, message, exc)
            return
        HANDLED.labels(sub.name, "ok").inc()
        self.queue.delete_one(_held(message))

    def _failed(self, name: str, message: dict[str, Any], exc: BaseException) -> None:
        attempt = int(message["attempt"])
        delay = self.policy.delay_after(attempt, exc)
        log.warning("%s: handler failed (attempt %d): %s", name, attempt, describe(exc))
        if delay is None:
            if self.queue.count_documents(_held(message), limit=1) == 0:
                return  # taken over meanwhile: the new holder settles it
            DEAD_LETTERS.labels(name).inc()
            # A duplicate: an earlier go recorded it and stopped before taking it off the
            # queue. The dead letter stands, and only that step is left to do.
            with contextlib.suppress(DuplicateKeyError):
                self.dead.insert_one({
                    "_id": message["_id"], "fn": name, "event": message["event"],
                    "event_id": message.get("event_id"), "reason": describe(exc),
                    "attempts": attempt, "at": _now(),
                })
            self.queue.delete_one(_held(message))
            log.error("%s: dead-lettered event %s after %d attempt(s): %s", name,
                      message.get("event_id"), attempt, describe(exc))
            return
        RETRIES.labels(name).inc()
        self.queue.update_one(_held(message), {"$set": {
            "attempt": attempt + 1, "due_at": _now() + timedelta(seconds=delay),
            "lease_until": None, "last_error": describe(exc)}})

    def dead_letters(self, name: str) -> list[dict[str, Any]]:
        return list(self.dead.find({"fn": name}).sort("at", ASCENDING))
