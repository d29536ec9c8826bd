"""CloudEvents codecs: HTTP binary and structured modes, the AMQP binding, Knative's headers."""

from __future__ import annotations

import json

import pika
import pytest

from events import amqp_codec, http_codec
from events.catalog import DOCUMENT_STORED, DOCUMENT_UPLOADED, DocumentUploaded
from events.cloudevent import MalformedEvent, make_event, validate

DOC = "0123456789abcdef0123456789abcdef"


def _event() -> object:
    return make_event(DOCUMENT_UPLOADED, "/docproc/documents", DOC, DocumentUploaded(
        document_id=DOC, owner="driver-1", filename="a.pdf", declared_type="application/pdf",
        size=3, sha256="a" * 64))


@pytest.mark.parametrize("structured", [False, True])
def test_http_round_trip(structured: bool) -> None:
    event = _event()
    headers, body = http_codec.encode(event, structured=structured)  # type: ignore[arg-type]
    if structured:
        assert headers["content-type"].startswith("application/cloudevents+json")
    else:
        assert headers["ce-type"] == DOCUMENT_UPLOADED
        assert headers["ce-subject"] == DOC
    back = http_codec.decode(headers, body)
    assert back["id"] == event["id"]  # type: ignore[index]
    assert validate(back) == validate(event)  # type: ignore[arg-type]


def test_amqp_binding_round_trip() -> None:
    event = _event()
    props, body = amqp_codec.encode(event)  # type: ignore[arg-type]
    assert props.headers["cloudEvents_type"] == DOCUMENT_UPLOADED
    assert props.headers["cloudEvents_specversion"] == "1.0"
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert json.loads(body)["document_id"] == DOC
    back = amqp_codec.decode(props, body)
    assert back["id"] == event["id"]  # type: ignore[index]
    assert validate(back).model_dump() == validate(event).model_dump()  # type: ignore[arg-type]


def test_amqp_decodes_knative_rabbitmq_broker_headers_and_colon_prefix() -> None:
    body = json.dumps(validate(_event()).model_dump()).encode()  # type: ignore[arg-type]
    for headers in (
        {"specversion": "1.0", "id": "k1", "type": DOCUMENT_UPLOADED, "source": "/k"},
        {"cloudEvents:specversion": "1.0", "cloudEvents:id": "k1",
         "cloudEvents:type": DOCUMENT_UPLOADED, "cloudEvents:source": "/k"},
    ):
        event = amqp_codec.decode(pika.BasicProperties(content_type="application/json",
                                                       headers=headers), body)
        assert event["id"] == "k1"
        assert validate(event).document_id == DOC  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("attrs", "data", "complaint"),
    [
        ({"specversion": "0.3"}, None, "specversion"),
        ({"type": "com.example.unknown"}, None, "unknown event type"),
        ({}, {"document_id": "nope"}, "document_id"),
        ({}, {"extra": 1}, "extra"),
        ({"type": DOCUMENT_STORED}, None, "download_url"),
    ],
)
def test_malformed_events_are_refused_clearly(attrs: dict[str, str], data: object,
                                              complaint: str) -> None:
    from cloudevents.http import CloudEvent

    good = validate(_event()).model_dump()  # type: ignore[arg-type]
    payload = good if data is None else {**good, **data}  # type: ignore[dict-item]
    event = CloudEvent({"id": "1", "source": "/t", "type": DOCUMENT_UPLOADED, **attrs}, payload)
    with pytest.raises(MalformedEvent) as info:
        validate(event)
    assert complaint in str(info.value)


def test_missing_attributes_and_oversized_bodies_are_refused() -> None:
    with pytest.raises(MalformedEvent, match="no CloudEvent attributes"):
        amqp_codec.decode(pika.BasicProperties(headers={}), b"{}")
    with pytest.raises(MalformedEvent, match="'source'"):
        amqp_codec.decode(pika.BasicProperties(headers={
            "cloudEvents_id": "1", "cloudEvents_type": DOCUMENT_UPLOADED,
            "cloudEvents_specversion": "1.0"}), b"{}")
    with pytest.raises(MalformedEvent, match="larger"):
        http_codec.decode({"ce-id": "1"}, b"x" * 70_000)
    with pytest.raises(MalformedEvent):
        http_codec.decode({"content-type": "application/json"}, b"{}")
