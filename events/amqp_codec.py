"""CloudEvents over AMQP 0-9-1 (RabbitMQ), after the CloudEvents AMQP protocol binding.

Binary content mode: the event data is the message body, ``datacontenttype`` is the
``content_type`` property, and every other attribute is an application property (a header)
named ``cloudEvents_<attribute>``; the ``cloudEvents:`` spelling of the binding is accepted too.
Knative's RabbitMQ broker writes the attributes as plain lower-case headers (``specversion``,
``id``, ...) instead; decoding accepts that form so events can be read off its queues.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pika
from cloudevents.http import CloudEvent

from events.cloudevent import MAX_EVENT_BYTES, MalformedEvent

PREFIX = "cloudEvents_"
_PREFIXES = ("cloudEvents_", "cloudEvents:")
_KNATIVE_ATTRS = frozenset(
    {"specversion", "id", "type", "source", "subject", "time", "dataschema"}
)


def encode(event: CloudEvent) -> tuple[pika.BasicProperties, bytes]:
    attrs = dict(event.get_attributes())
    content_type = str(attrs.pop("datacontenttype", "application/json"))
    data = event.get_data()
    if isinstance(data, bytes):
        body = data
    elif isinstance(data, str):
        body = data.encode()
    else:
        body = json.dumps(data, separators=(",", ":")).encode()
    headers = {PREFIX + name: str(value) for name, value in attrs.items() if value is not None}
    props = pika.BasicProperties(
        content_type=content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=str(attrs["id"]),
        type=str(attrs["type"]),
        headers=headers,
    )
    return props, body


def decode(props: pika.BasicProperties, body: bytes) -> CloudEvent:
    if len(body) > MAX_EVENT_BYTES:
        raise MalformedEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
    attrs = attributes(props.headers or {})
    if not attrs:
        raise MalformedEvent("message carries no CloudEvent attributes")
    if props.content_type:
        attrs["datacontenttype"] = props.content_type
    data: Any = body
    if attrs.get("datacontenttype", "application/json").startswith("application/json"):
        try:
            data = json.loads(body) if body else None
        except ValueError as exc:
            raise MalformedEvent(f"event data is not JSON: {exc}") from exc
    for name in ("id", "source", "type", "specversion"):
        if not attrs.get(name):
            raise MalformedEvent(f"missing CloudEvent attribute {name!r}")
    try:
        return CloudEvent(attrs, data)
    except Exception as exc:  # the SDK raises a family of its own errors
        raise MalformedEvent(f"not a CloudEvent: {exc}") from exc


def attributes(headers: Mapping[str, Any]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for key, value in headers.items():
        text = value.decode() if isinstance(value, bytes) else str(value)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                attrs[key[len(prefix):]] = text
                break
        else:
            if key in _KNATIVE_ATTRS:
                attrs.setdefault(key, text)
    return attrs
