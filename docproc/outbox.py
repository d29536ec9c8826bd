"""Publishing through the transactional outbox, and the relay that finishes the job.

The upload's event is written into its document's record in the same write as the
`processing` state it announces. The process then publishes it and, once the broker
confirmed, marks it published (shared/outbox_marks.py), unless storage recorded the outcome
first, which empties the outbox. When publishing fails or the process dies in between, the
event stays in the record and the relay, running in every process that publishes, sends it
later: a document recorded as `processing` always has its event published. Storage's
outcome goes into the outbox only when the broker refuses it (``publish_outcome``).
Consumers are idempotent, so the rare double publish changes nothing.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from cloudevents.conversion import to_json
from cloudevents.http import CloudEvent, from_json

from docproc.runtime import NoTransport, Services
from events.publisher import PublishError
from shared.documents import OutboxEvent

log = logging.getLogger(__name__)

RELAY_LEASE = timedelta(seconds=30)


def outbox_event(event: CloudEvent) -> OutboxEvent:
    return OutboxEvent(id=str(event["id"]), payload=to_json(event).decode())


def publish_recorded(svc: Services, doc_id: str, event: CloudEvent) -> bool:
    """Publish an event already in the document's outbox; False leaves it to the relay.
    The confirmed event leaves the outbox with the next batch of marks (shared/outbox_marks)."""
    if not _publish(svc, doc_id, event):
        return False
    svc.marks.add(doc_id, str(event["id"]))
    return True


def publish_outcome(svc: Services, doc_id: str, event: CloudEvent) -> None:
    """Publish the event announcing an outcome ``finish`` just recorded.

    The event being handled is acknowledged only after this returns, so a crash before the
    broker confirmed redelivers it, and the handler announces the recorded outcome again:
    that event needs no outbox on the way. Only a publish that fails goes there, for the
    relay to send once the broker is back (if even that write fails, the error makes the
    event being handled retried, with the same effect)."""
    if not _publish(svc, doc_id, event):
        svc.documents.record_unpublished(doc_id, outbox_event(event))


def _publish(svc: Services, doc_id: str, event: CloudEvent) -> bool:
    try:
        svc.publish(event)
    except (PublishError, NoTransport) as exc:
        log.warning("event %s for document %s is left to the outbox relay: %s", event["id"],
                    doc_id, exc)
        return False
    return True


def relay_once(svc: Services, limit: int = 100, retry_after: timedelta = RELAY_LEASE) -> int:
    """Publish what the outboxes hold; the number of events sent."""
    sent = 0
    for _ in range(limit):
        doc = svc.documents.claim_outbox(RELAY_LEASE)
        if doc is None:
            break
        if not doc.outbox:
            svc.documents.outbox_drained(doc)  # published by its request already
            continue
        for entry in doc.outbox:
            if not _publish(svc, doc.id, from_json(entry["event"])):
                # The broker is away: look again soon, and leave the rest for then.
                svc.documents.reschedule_outbox(doc.id, retry_after)
                return sent
            # Marked at once, not batched: the drain below stops the relay looking at the
            # record, so a mark that failed later would leave the event unpublished for good.
            svc.documents.published(doc.id, str(entry["id"]))
            sent += 1
        svc.documents.outbox_drained(doc)
    if sent:
        log.info("outbox relay published %d event(s)", sent)
    return sent


class OutboxRelay:
    def __init__(self, svc: Services, interval: float | None = None) -> None:
        self.svc = svc
        self.interval = interval or svc.settings.relay_interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> OutboxRelay:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                relay_once(self.svc, retry_after=timedelta(seconds=5 * self.interval))
            except Exception as exc:  # a database outage must not kill the relay
                log.warning("outbox relay: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
