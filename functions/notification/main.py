"""Notification function, subscribed to document.stored and document.rejected.

Sends the uploader's devices an FCM message carrying the document id, its status and, when
stored, the download link; removes tokens FCM reports unregistered; records the delivery.
The delivery record makes the handler idempotent: a redelivered or duplicated event sends
nothing more, and a retry after a partial failure only reaches the devices still missing it.
Run alone with ``functions-framework --source functions/notification/main.py
--target notification --signature-type cloudevent``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import flask
import functions_framework
from cloudevents.http import CloudEvent
from pymongo.errors import PyMongoError

from docproc.health import add_to_flask
from docproc.runtime import Services, as_http_status, services
from events.batches import handle_repeats, split
from events.catalog import DocumentRejected, DocumentStored
from events.cloudevent import MalformedEvent, validate
from events.subscriptions import Subscription, describe
from shared.deliveries import Completion, Delivery
from shared.observability import NOTIFICATIONS
from shared.push import PushMessage, PushResult

log = logging.getLogger(__name__)

# A claim's lease is the sender's worst case for one send plus this: a batch's later events
# start their sends on the lease taken with the batch's claims unless that much of it has
# gone by (then it is renewed first), and a crashed worker's claim is taken over soon after.
LEASE_MARGIN_SECONDS = 30.0


def lease_seconds(svc: Services, messages: int = 1) -> float:
    """A claim's lease: long enough for a send of ``messages`` (a user's devices are few,
    ``shared.users.MAX_DEVICES``; the claim is taken before they are known, and renewed to fit)."""
    return svc.push.worst_case_seconds(messages) + LEASE_MARGIN_SECONDS


class PushNotDelivered(Exception):
    """FCM asked us to come back later for some devices; the event is retried, no sooner
    than FCM's Retry-After."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def handle(svc: Services, event: CloudEvent) -> None:
    key, data = _parse(event)
    delivery = svc.deliveries.claim(key, data.document_id, data.owner, lease_seconds(svc))
    completion = _attempt(svc, key, data, delivery)
    if completion is not None:
        try:
            svc.deliveries.complete(*completion)
        except BaseException as exc:
            svc.deliveries.release(key, describe(exc), delivery.holder)
            raise


def handle_batch(svc: Services, events: Sequence[CloudEvent]) -> list[BaseException | None]:
    """``handle`` for several events, with one write for their claims and one for their
    completions; each event's outcome on its own."""
    batch = split(events, _parse)
    outcomes = batch.outcomes
    claims = svc.deliveries.claim_many(
        [(key, data.document_id, data.owner) for key, (_, data) in batch.first.items()],
        lease_seconds(svc))
    completions: list[tuple[int, Completion]] = []
    holders: dict[str, str | None] = {}
    for (key, (i, data)), claim in zip(batch.first.items(), claims, strict=True):
        if isinstance(claim, Exception):
            outcomes[i] = claim
            continue
        holders[key] = claim.holder
        completion = batch.attempt(i, "notification",
                                   functools.partial(_attempt, svc, key, data, claim))
        if completion is not None:
            completions.append((i, completion))
    try:
        svc.deliveries.complete_many([completion for _, completion in completions])
    except Exception as exc:
        # Sent but not recorded: released, as one event's failed completion is, to be retried.
        for i, (key, _, _) in completions:
            outcomes[i] = exc
            try:
                svc.deliveries.release(key, describe(exc), holders[key])
            except Exception as also:  # the lease runs out by itself
                log.warning("could not release delivery %s: %s", key, describe(also))
    return handle_repeats(batch, lambda event: handle(svc, event), "notification")


def _parse(event: CloudEvent) -> tuple[str, DocumentStored | DocumentRejected]:
    data = validate(event)
    if not isinstance(data, DocumentStored | DocumentRejected):
        raise MalformedEvent(f"notification does not handle {event['type']}")
    return str(event["id"]), data


def _attempt(svc: Services, key: str, data: DocumentStored | DocumentRejected,
             delivery: Delivery) -> Completion | None:
    """Send what a claimed delivery still owes; its completion to record, or None when an
    earlier attempt completed it. Releases the claim if anything fails."""
    if delivery.completed:
        log.info("delivery %s already completed; nothing sent", key)
        return None
    try:
        return _deliver(svc, key, data, delivery)
    except BaseException as exc:
        svc.deliveries.release(key, describe(exc), delivery.holder)
        raise


def _deliver(svc: Services, key: str, data: DocumentStored | DocumentRejected,
             delivery: Delivery) -> Completion:
    user = svc.users.get(data.owner)
    tokens = [d.token for d in user.devices] if user and user.status == "active" else []
    messages = [_message(token, data) for token in tokens if delivery.owes(token)]
    already = len(tokens) - len(messages)
    if messages:
        # The batch's claims were taken together; this send must not outlive its lease, or
        # a redelivery could take the delivery over and send beside it.
        svc.deliveries.hold(delivery, lease_seconds(svc, len(messages)),
                            svc.push.worst_case_seconds(len(messages)))
    results = svc.push.send(messages) if messages else []
    sent: list[tuple[str, str | None]] = []
    unregistered: list[str] = []
    later: list[PushResult] = []
    failed: list[str] = []
    for result in results:
        NOTIFICATIONS.labels(result.outcome).inc()
        if result.outcome == "sent":
            sent.append((result.token, result.message_id))
        elif result.outcome == "unregistered":
            unregistered.append(result.token)
        elif result.outcome == "retry":
            later.append(result)
        else:
            failed.append(result.token)
            log.warning("push to a device of %s failed for good: %s", data.owner, result.error)
    if unregistered:
        _forget_tokens(svc, data.owner, unregistered)
    if later:
        svc.deliveries.mark_sent(key, sent)  # the retry only reaches the others
        hints = [r.retry_after for r in later if r.retry_after is not None]
        raise PushNotDelivered(f"{len(later)} device(s) to retry: {later[0].error}",
                               max(hints) if hints else None)
    log.info("announced %s of document %s to %d of %d device(s)", data.__class__.__name__,
             data.document_id, already + len(sent), len(tokens))
    return key, {
        "devices": len(tokens),
        "sent": already + len(sent),
        "unregistered": len(unregistered),
        "failed": len(failed),
    }, sent


def _forget_tokens(svc: Services, owner: str, tokens: list[str]) -> None:
    """Best effort: failing here must not undo the sends above (the delivery would be
    released with nothing marked sent, and its retry would push to those devices again).
    A token left behind is reported unregistered again on the next push."""
    try:
        svc.users.remove_tokens(owner, tokens)
    except PyMongoError as exc:
        log.warning("could not remove %d unregistered device(s) of %s: %s", len(tokens), owner,
                    describe(exc))


def _message(token: str, data: DocumentStored | DocumentRejected) -> PushMessage:
    if isinstance(data, DocumentStored):
        return PushMessage(
            token=token,
            title="Document stored",
            body=f"{data.filename} is stored and ready to download.",
            data={"document_id": data.document_id, "status": "stored",
                  "download_url": data.download_url},
        )
    return PushMessage(
        token=token,
        title="Document not accepted",
        body=f"{data.filename} was not accepted: {data.reason}"[:240],
        data={"document_id": data.document_id, "status": "rejected", "reason": data.reason},
    )


def subscription(svc: Services) -> Subscription:
    return Subscription("notification", lambda event: handle(svc, event),
                        lambda events: handle_batch(svc, events))


@functions_framework.cloud_event
def notification(event: CloudEvent) -> None:
    with as_http_status(event, "notification"):
        handle(services(), event)


if flask.has_app_context():  # loaded by functions-framework: add the GET endpoints
    add_to_flask(flask.current_app, services, needs_broker=False)
