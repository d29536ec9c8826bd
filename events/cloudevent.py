"""Building CloudEvents from the catalog's models and validating the ones that arrive."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

from cloudevents.http import CloudEvent
from pydantic import ValidationError

from events.catalog import MODELS, EventData, dataschema
from shared.observability import child_traceparent, current_traceparent, log_context

# Knative's RabbitMQ broker and most sinks cap messages far below this; our events are small.
MAX_EVENT_BYTES = 64 * 1024
REQUIRED = ("id", "source", "type", "specversion")
T = TypeVar("T", bound=EventData)


class MalformedEvent(Exception):
    """The event cannot be processed however often it is retried."""


def make_event(
    event_type: str, source: str, subject: str, data: EventData, event_id: str | None = None
) -> CloudEvent:
    if type(data) is not MODELS.get(event_type):
        raise TypeError(f"{type(data).__name__} is not the data model of {event_type}")
    attributes = {
        "id": event_id or uuid.uuid4().hex,
        "type": event_type,
        "source": source,
        "subject": subject,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "dataschema": dataschema(event_type),
        # The CloudEvents distributed-tracing extension: one trace from upload to push.
        "traceparent": child_traceparent(current_traceparent()),
    }
    return CloudEvent(attributes, data.model_dump(mode="json"))


def validate(event: CloudEvent) -> EventData:
    """Check the attributes and the data of an incoming event against the catalog."""
    attrs = event.get_attributes()
    missing = [name for name in REQUIRED if not attrs.get(name)]
    if missing:
        raise MalformedEvent(f"missing CloudEvent attributes: {', '.join(missing)}")
    if attrs["specversion"] != "1.0":
        raise MalformedEvent(f"unsupported specversion {attrs['specversion']!r}")
    model = MODELS.get(str(attrs["type"]))
    if model is None:
        raise MalformedEvent(f"unknown event type {attrs['type']!r}")
    data = event.get_data()
    if isinstance(data, bytes | str):
        if len(data) > MAX_EVENT_BYTES:
            raise MalformedEvent("event data too large")
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise MalformedEvent(f"event data is not JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise MalformedEvent(f"invalid {attrs['type']} data: {errors}") from exc


def data_as(event: CloudEvent, model: type[T]) -> T:
    data = validate(event)
    if not isinstance(data, model):
        raise MalformedEvent(f"expected {model.__name__}, got {type(data).__name__}")
    return data


def handling(event: CloudEvent, function: str) -> Any:
    """Log context for handling ``event``: its id, document and trace."""
    attrs = event.get_attributes()
    return log_context(function=function, event_id=str(attrs.get("id")),
                       document_id=str(attrs.get("subject") or "") or None,
                       traceparent=child_traceparent(attrs.get("traceparent")))


def summary(event: CloudEvent) -> dict[str, Any]:
    """Attributes safe to log: never the data."""
    attrs = event.get_attributes()
    return {k: attrs.get(k) for k in ("id", "type", "source", "subject")}
