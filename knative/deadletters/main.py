"""Dead-letter sink of the Knative Triggers: records each event Knative gave up on.

Every Trigger's ``delivery.deadLetterSink`` points here with the subscriber's name as the
path (``/storage``, ``/notification``; ``/broker`` for the Broker's own), so a record says
which function failed, what Knative saw (``knativeerrorcode``, ``knativeerrordest``,
``knativeerrordata``) and the event's attributes. The event's data is deliberately not kept:
a ``document.stored`` carries a download link, which docproc only ever stores sealed, and all
of it can be derived again from the document record. The subject is the document id, so an
operator replays with ``docproc reprocess <subject>`` (knative/README.md, "Dead letters").

Run with ``functions-framework --source knative/deadletters/main.py --target dead_letter
--signature-type cloudevent`` (the image does, with FUNCTION_SOURCE set).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from datetime import UTC, datetime
from typing import Any

import flask
import functions_framework
from cloudevents.http import CloudEvent
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from shared.config import ConfigError, load_settings
from shared.mongo import MongoHandle, open_mongo

log = logging.getLogger(__name__)

COLLECTION = "knative_dead_letters"
KEPT_ATTRIBUTES = ("id", "type", "source", "subject", "time", "dataschema", "traceparent")
MAX_ERROR_TEXT = 1000

_handle: MongoHandle | None = None
_lock = threading.Lock()


def _collection() -> Collection[dict[str, Any]]:
    global _handle
    if _handle is None:
        with _lock:
            if _handle is None:
                settings = load_settings()
                if not settings.mongodb_uri:
                    # An embedded database would live and die with this pod's scratch volume.
                    raise ConfigError("MONGODB_URI: the dead-letter sink needs the shared "
                                      "MongoDB server")
                _handle = open_mongo(settings)
    return _handle.db[COLLECTION]


def _error_text(encoded: object) -> str | None:
    """Knative sends the subscriber's response body base64-encoded."""
    if not isinstance(encoded, str) or not encoded:
        return None
    try:
        text = base64.b64decode(encoded, validate=True).decode(errors="replace")
    except (binascii.Error, ValueError):
        text = encoded
    return text[:MAX_ERROR_TEXT]


def record(collection: Collection[dict[str, Any]], function: str, event: CloudEvent) -> None:
    """Store the dead letter once: a redelivery of the same one only counts up."""
    attrs = event.get_attributes()
    now = datetime.now(UTC)
    collection.update_one(
        {"_id": f"{function}:{attrs['id']}"},
        {
            "$setOnInsert": {
                "function": function,
                "event": {k: str(attrs[k]) for k in KEPT_ATTRIBUTES if attrs.get(k)},
                "error_code": attrs.get("knativeerrorcode"),
                "error_destination": attrs.get("knativeerrordest"),
                "error": _error_text(attrs.get("knativeerrordata")),
                "first_at": now,
            },
            "$set": {"last_at": now},
            "$inc": {"deliveries": 1},
        },
        upsert=True,
    )
    log.warning("dead letter for %s: %s %s subject=%s code=%s", function, attrs.get("type"),
                attrs["id"], attrs.get("subject"), attrs.get("knativeerrorcode"))


@functions_framework.cloud_event
def dead_letter(event: CloudEvent) -> None:
    function = flask.request.path.strip("/") or "unknown"
    # An exception answers 500, so Knative keeps the dead letter and tries again.
    record(_collection(), function, event)


def _healthz() -> flask.Response:
    return flask.jsonify({"status": "ok"})


def _readyz() -> tuple[flask.Response, int]:
    try:
        _collection().database.client.admin.command("ping")
    except (ConfigError, PyMongoError) as exc:
        return flask.jsonify({"status": "unavailable", "error": type(exc).__name__}), 503
    return flask.jsonify({"status": "ready"}), 200


if flask.has_app_context():  # loaded by functions-framework: add the probe endpoints
    flask.current_app.add_url_rule("/healthz", "deadletters_healthz", _healthz,
                                   methods=["GET"])
    flask.current_app.add_url_rule("/readyz", "deadletters_readyz", _readyz, methods=["GET"])
