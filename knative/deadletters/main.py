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

import threading
from typing import Any

import flask
import functions_framework
from cloudevents.http import CloudEvent
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from shared.config import ConfigError, load_settings
from shared.knative_dead_letters import COLLECTION, record
from shared.mongo import MongoHandle, open_mongo

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
