"""Storage function (the seed's Document Storage Service), subscribed to document.uploaded.

Verifies the staged object (size, every chunk's authentication), sniffs the real
media type, extracts basic metadata, and either makes the staged object the stored one (a
rename: staging already used the final envelope format, so no second encryption pass) and
records its sealed download link, or rejects it with a reason. Either way it announces the
outcome. Run alone with ``functions-framework --source functions/storage/main.py
--target storage --signature-type cloudevent``.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import flask
import functions_framework
from cloudevents.http import CloudEvent

from docproc.health import add_to_flask
from docproc.outbox import publish_outcome
from docproc.runtime import Services, as_http_status, services
from events.batches import handle_repeats, split
from events.catalog import (
    DOCUMENT_REJECTED,
    DOCUMENT_STORED,
    DocumentRejected,
    DocumentStored,
    DocumentUploaded,
)
from events.cloudevent import data_as, make_event
from events.subscriptions import Subscription
from shared.blobstore import Area, release_pages
from shared.documents import Document, Outcome, Status
from shared.envelope import EnvelopeError, EnvelopeReader, decrypt_stream
from shared.inspection import SNIFF_BYTES, InvalidDocument, extract_metadata, sniff
from shared.inspection.isolated import INSPECT_IN_PROCESS, inspect_isolated, needs_isolation
from shared.observability import PROCESSING
from shared.sealed import seal, unseal

log = logging.getLogger(__name__)

# Up to this size a document is inspected from the plaintext its verification produced:
# memory for it is bounded per handler thread, and larger documents are read again (a PDF
# or TIFF by an inspector process: shared/inspection/isolated.py).
INSPECT_IN_MEMORY = INSPECT_IN_PROCESS


@dataclass
class Verdict:
    status: Status
    media_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def handle(svc: Services, event: CloudEvent) -> None:
    data = data_as(event, DocumentUploaded)
    decided = _decide(svc, event, data.document_id, svc.documents.get(data.document_id))
    if decided is not None:
        _conclude(svc, decided, svc.documents.finish_many([decided.outcome])[0])


def handle_batch(svc: Services, events: Sequence[CloudEvent]) -> list[BaseException | None]:
    """``handle`` for several events: their records read in one query and their outcomes
    recorded in one write; each event's outcome on its own."""
    batch = split(events, _document_id)
    outcomes = batch.outcomes
    docs = svc.documents.get_many(list(batch.first))
    pending: list[tuple[int, _Decided]] = []
    for doc_id, (i, _) in batch.first.items():
        decided = batch.attempt(i, "storage", functools.partial(
            _decide, svc, events[i], doc_id, docs.get(doc_id)))
        if decided is not None:
            pending.append((i, decided))
    try:
        finished = svc.documents.finish_many([decided.outcome for _, decided in pending])
    except Exception as exc:
        # What the write did is unknown: every one of them is retried, with this error as
        # its reason, and a redelivery announces whatever outcome was recorded.
        for i, _ in pending:
            outcomes[i] = exc
    else:
        for (i, decided), done in zip(pending, finished, strict=True):
            batch.attempt(i, "storage", functools.partial(_conclude, svc, decided, done))
    return handle_repeats(batch, lambda event: handle(svc, event), "storage")


def _document_id(event: CloudEvent) -> tuple[str, None]:
    return data_as(event, DocumentUploaded).document_id, None


@dataclass
class _Decided:
    """A document examined: the outcome to record and the event that announces it."""

    outcome: Outcome
    event: CloudEvent


def _decide(svc: Services, event: CloudEvent, doc_id: str,
            doc: Document | None) -> _Decided | None:
    """Examine a `processing` document and decide its outcome (the object already in place
    when stored); None when there is nothing to record."""
    if doc is None:
        # The upload was withdrawn before it was acknowledged; nothing to store.
        log.warning("document %s from event %s does not exist", doc_id, event["id"])
        return None
    if doc.status == Status.DELETED:
        log.info("document %s was deleted before it was stored", doc.id)
        return None
    if doc.status != Status.PROCESSING:
        # A redelivery after the outcome was recorded: announce it again (same event id, so
        # consumers see a duplicate, not a second outcome).
        _announce(svc, doc)
        return None
    area = Area.STAGING if svc.blobs.exists(Area.STAGING, doc.id) else Area.OBJECTS
    data_key = svc.keys.unwrap(doc.key, {"document_id": doc.id})
    verdict = _examine(svc, doc, area, data_key)
    if verdict.status != Status.STORED:
        return _Decided((doc, verdict.status, {"reason": verdict.reason,
                                               "media_type": verdict.media_type}),
                        _rejected_event(svc, doc, verdict.status, verdict.reason))
    if area == Area.STAGING:
        svc.blobs.promote(doc.id)
    link = svc.links.sign(doc.id, svc.settings.link_ttl_seconds)
    expires = datetime.fromtimestamp(link.expires, UTC)
    fields = {"media_type": verdict.media_type, "metadata": verdict.metadata,
              "download_url_enc": seal(data_key, link.url.encode(), doc.id.encode()),
              "download_url_expires": expires}
    return _Decided((doc, Status.STORED, fields),
                    _stored_event(svc, doc, verdict.media_type or doc.declared_type, link.url,
                                  expires))


def _conclude(svc: Services, decided: _Decided, finished: Document | None) -> None:
    """Announce the outcome we recorded, or, when the document had left `processing`
    meanwhile, the one it has."""
    doc = decided.outcome[0]
    if finished is not None:
        PROCESSING.labels(finished.status.value).observe(
            (finished.updated_at - finished.created_at).total_seconds())
        if finished.status != Status.STORED:
            svc.blobs.delete(Area.STAGING, doc.id)
        publish_outcome(svc, doc.id, decided.event)
        return
    current = svc.documents.get(doc.id)
    if current is None:
        return
    if current.status == Status.DELETED:
        # Deleted while we worked: whatever we moved into place goes too.
        for leftover in Area:
            svc.blobs.delete(leftover, doc.id)
        return
    _announce(svc, current)


def _examine(svc: Services, doc: Document, area: Area, data_key: bytes) -> Verdict:
    aad = doc.id.encode()
    size = 0
    head = b""
    # A small document's plaintext is kept from this pass for the inspection below, which
    # otherwise opens the object again and seeks through a decrypting view of it.
    kept: list[bytes] | None = []
    # Every chunk is authenticated under the document's own key, in order, up to the final
    # one: that proves these are the bytes the upload encrypted (and hashed as they came
    # in), so hashing them a second time here would add a pass over the document and no
    # assurance; SHA-256 is the slower half of that pass.
    try:
        with svc.blobs.open(area, doc.id) as source:
            for chunk in decrypt_stream(data_key, source, associated_data=aad):
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                size += len(chunk)
                if kept is not None and size <= INSPECT_IN_MEMORY:
                    kept.append(chunk)
                else:
                    kept = None
            if kept is not None:
                # The last read of a small object: its pages are better spent on the next
                # upload (a larger one is read once more below).
                release_pages(source)
    except EnvelopeError as exc:
        return Verdict(Status.FAILED, reason=f"stored object failed its integrity check: {exc}")
    if size != doc.size:
        return Verdict(Status.FAILED, reason=f"stored object holds {size} bytes, the upload "
                                             f"recorded {doc.size}")
    media_type = sniff(head)
    allowed = svc.settings.allowed_types
    if media_type is None or media_type not in allowed:
        return Verdict(Status.REJECTED, media_type=media_type,
                       reason=f"content is {media_type or 'of an unknown type'}, "
                              f"accepted types are {', '.join(allowed)}")
    if media_type != doc.declared_type:
        return Verdict(Status.REJECTED, media_type=media_type,
                       reason=f"declared {doc.declared_type} but the content is {media_type}")
    try:
        if kept is not None:
            metadata = extract_metadata(media_type, io.BytesIO(b"".join(kept)))
        elif needs_isolation(media_type, size):
            metadata = inspect_isolated(
                media_type, svc.blobs.path(area, doc.id), data_key, aad,
                memory_bytes=svc.settings.inspection_memory_mib * 1024 * 1024,
                seconds=svc.settings.inspection_seconds)
        else:
            with svc.blobs.open(area, doc.id) as source:
                plain = io.BufferedReader(EnvelopeReader(data_key, source, associated_data=aad))
                metadata = extract_metadata(media_type, plain)
                release_pages(source)
    except InvalidDocument as exc:
        return Verdict(Status.REJECTED, media_type=media_type, reason=str(exc))
    return Verdict(Status.STORED, media_type=media_type, metadata=metadata)


def _stored_event(svc: Services, doc: Document, media_type: str, url: str,
                  expires: datetime) -> CloudEvent:
    return make_event(
        DOCUMENT_STORED, svc.settings.event_source, doc.id,
        DocumentStored(document_id=doc.id, owner=doc.owner, filename=doc.filename,
                       media_type=media_type, size=doc.size, sha256=doc.sha256,
                       download_url=url, download_url_expires=int(expires.timestamp())),
        event_id=f"{doc.id}.stored",
    )


def _rejected_event(svc: Services, doc: Document, status: Status,
                    reason: str | None) -> CloudEvent:
    return make_event(
        DOCUMENT_REJECTED, svc.settings.event_source, doc.id,
        DocumentRejected(document_id=doc.id, owner=doc.owner, filename=doc.filename,
                         reason=reason or "not accepted"),
        event_id=f"{doc.id}.{status.value}",
    )


def _announce(svc: Services, doc: Document) -> None:
    """Publish the recorded outcome of a finished document again (same event id)."""
    if doc.status == Status.STORED:
        if doc.download_url_enc is None or doc.download_url_expires is None:
            raise RuntimeError(f"stored document {doc.id} has no download link")
        data_key = svc.keys.unwrap(doc.key, {"document_id": doc.id})
        url = unseal(data_key, doc.download_url_enc, doc.id.encode()).decode()
        event = _stored_event(svc, doc, doc.media_type or doc.declared_type, url,
                              doc.download_url_expires)
    else:
        # Whatever is left of a document that was not stored is useless: remove it.
        svc.blobs.delete(Area.STAGING, doc.id)
        event = _rejected_event(svc, doc, doc.status, doc.reason)
    svc.publish(event)
    svc.documents.published(doc.id, str(event["id"]))


def subscription(svc: Services) -> Subscription:
    return Subscription("storage", lambda event: handle(svc, event),
                        lambda events: handle_batch(svc, events))


@functions_framework.cloud_event
def storage(event: CloudEvent) -> None:
    with as_http_status(event, "storage"):
        handle(services(), event)


if flask.has_app_context():  # loaded by functions-framework: add the GET endpoints
    add_to_flask(flask.current_app, services, needs_broker=False)
