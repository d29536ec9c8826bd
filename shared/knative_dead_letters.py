"""The dead letters Knative gave up on, as the sink (knative/deadletters) records them in
MongoDB and `docproc dlq` reads them: one record per function and event id, with Knative's
error and the event's attributes but not its data (a ``document.stored`` carries a download
link, which docproc only ever stores sealed; the document record holds all of it again)."""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime
from typing import Any

from cloudevents.http import CloudEvent
from pymongo.collection import Collection

log = logging.getLogger(__name__)

COLLECTION = "knative_dead_letters"
KEPT_ATTRIBUTES = ("id", "type", "source", "subject", "time", "dataschema", "traceparent")
MAX_ERROR_TEXT = 1000


def _error_text(encoded: object) -> str | None:
    """Knative sends the subscriber's response body base64-encoded."""
    if not isinstance(encoded, str) or not encoded:
        return None
    try:
        text = base64.b64decode(encoded, validate=True).decode(errors="replace")
    except (binascii.Error, ValueError):
        text = encoded
    return text[:MAX_ERROR_TEXT]


def record(collection: Collection[dict[str, Any]], function: str, event: CloudEvent, *,
           refused: str | None = None) -> None:
    """Store the dead letter once: a redelivery of the same one only counts up.

    ``refused``: the function itself refused the event for good (answering 400), and this
    says why; Knative's error attributes are what the sink records otherwise."""
    attrs = event.get_attributes()
    now = datetime.now(UTC)
    collection.update_one(
        {"_id": f"{function}:{attrs['id']}"},
        {
            "$setOnInsert": {
                "function": function,
                "event": {k: str(attrs[k]) for k in KEPT_ATTRIBUTES if attrs.get(k)},
                "error_code": "400" if refused is not None else attrs.get("knativeerrorcode"),
                "error_destination": function if refused is not None
                else attrs.get("knativeerrordest"),
                "error": refused[:MAX_ERROR_TEXT] if refused is not None
                else _error_text(attrs.get("knativeerrordata")),
                "first_at": now,
            },
            "$set": {"last_at": now},
            "$inc": {"deliveries": 1},
        },
        upsert=True,
    )
    log.warning("dead letter for %s: %s %s subject=%s code=%s", function, attrs.get("type"),
                attrs["id"], attrs.get("subject"), attrs.get("knativeerrorcode"))
