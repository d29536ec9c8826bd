"""CloudEvents over HTTP (binary and structured content modes) with the cloudevents SDK."""

from __future__ import annotations

from collections.abc import Mapping

from cloudevents import exceptions as ce_errors
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from cloudevents.http import from_http as _from_http

from events.cloudevent import MAX_EVENT_BYTES, MalformedEvent


def encode(event: CloudEvent, *, structured: bool = False) -> tuple[dict[str, str], bytes]:
    headers, body = to_structured(event) if structured else to_binary(event)
    return dict(headers), body if isinstance(body, bytes) else str(body).encode()


def decode(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    if len(body) > MAX_EVENT_BYTES:
        raise MalformedEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
    try:
        return _from_http(dict(headers), body)
    except ce_errors.GenericException as exc:
        raise MalformedEvent(f"not a CloudEvent: {exc}") from exc
