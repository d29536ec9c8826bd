"""The seed's process flow on real RabbitMQ, Redis, a MongoDB wire server and FCM (stub):
upload → document.uploaded → storage on EFS + MongoDB → document.stored → push → download."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest
import requests

from events import amqp_codec, topology
from events.catalog import DOCUMENT_STORED, DOCUMENT_UPLOADED, DocumentUploaded
from events.cloudevent import make_event
from events.publisher import PublishError
from shared import large_uploads
from shared.blobstore import Area
from shared.config import Settings
from tests import samples
from tests.conftest import Running, serving
from tests.fcm_stub import FcmStub
from tests.helpers import DRIVER, register_device, settled, upload, wait_for
from tests.page_cache import cache_can_drop, resident_pages

pytestmark = pytest.mark.services


def _publish_raw(running: Running, event: object) -> None:
    """Put an event on the exchange as another publisher (or a redelivery) would."""
    settings = running.svc.settings
    props, body = amqp_codec.encode(event)  # type: ignore[arg-type]
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        chan = conn.channel()
        chan.confirm_delivery()
        chan.basic_publish(topology.exchange(settings.amqp_prefix), props.type, body, props,
                           mandatory=True)
    finally:
        conn.close()


def test_a_stored_object_leaves_the_page_cache(running: Running,
                                               http: requests.Session) -> None:
    """Storage reads a new object for the last time; its pages go to the next upload."""
    efs = running.svc.settings.efs_root
    if not cache_can_drop(efs):
        pytest.skip(f"{efs} is on a filesystem whose pages are the files")
    body = samples.pdf(samples.marker(), padding=3 * 1024 * 1024)
    resp = upload(http, running.base_url, body, "application/pdf", "scan.pdf")
    assert resp.status_code == 202, resp.text
    doc_id = resp.json()["id"]
    assert settled(http, running.base_url, doc_id)["status"] == "stored"
    path = running.svc.blobs.path(Area.OBJECTS, doc_id)
    wait_for(lambda: resident_pages(path) == 0, what="the object's pages to be dropped")
    got = http.get(f"{running.base_url}/v1/documents/{doc_id}", headers=DRIVER, timeout=30)
    assert http.get(got.json()["download_url"], headers=DRIVER, timeout=30).content == body


class _Recorded(large_uploads.LargeUploads):
    """The process's count of large uploads, noting whether each got a hashing thread."""

    def __init__(self, cores: int) -> None:
        super().__init__(cores)
        self.threads: list[bool] = []

    def enter(self) -> None:
        super().enter()
        self.threads.append(self.core_to_spare())


@pytest.mark.parametrize("cores", [1, 2])
def test_a_large_upload_is_hashed_and_stored_whole_with_or_without_a_core_to_spare(
    running: Running, http: requests.Session, monkeypatch: pytest.MonkeyPatch, cores: int,
) -> None:
    uploads = _Recorded(cores)
    monkeypatch.setattr(large_uploads, "LARGE_UPLOADS", uploads)
    body = samples.pdf(samples.marker(), padding=6 * 1024 * 1024)  # past the hash threshold
    resp = upload(http, running.base_url, body, "application/pdf", "scan.pdf")
    assert resp.status_code == 202, resp.text
    # One core: received and hashed inline, through one reused buffer; two: received ahead
    # and hashed on a thread while the request's thread encrypts and writes.
    assert uploads.threads == [cores > 1]
    assert uploads.in_flight == 0
    doc = settled(http, running.base_url, resp.json()["id"])
    assert doc["status"] == "stored", doc
    assert doc["sha256"] == hashlib.sha256(body).hexdigest()
    assert http.get(doc["download_url"], headers=DRIVER, timeout=30).content == body


@pytest.mark.parametrize(
    ("media_type", "make", "metadata"),
    [
        ("application/pdf", lambda m: samples.pdf(m, pages=3), {"pages": 3}),
        ("image/jpeg", lambda m: samples.jpeg(m, (64, 48)),
         {"width": 64, "height": 48, "format": "JPEG"}),
    ],
    ids=["pdf", "jpeg"],
)
def test_document_is_stored_downloadable_and_announced_once(
    running: Running, http: requests.Session, fcm: FcmStub, media_type: str,
    make: object, metadata: dict[str, object],
) -> None:
    register_device(http, running.base_url, "phone-1")
    body = make(samples.marker())  # type: ignore[operator]
    resp = upload(http, running.base_url, body, media_type, "delivery note.bin")
    assert resp.status_code == 202, resp.text
    doc_id = resp.json()["id"]
    assert resp.json() == {"id": doc_id, "status": "processing"}
    assert resp.headers["Location"] == f"/v1/documents/{doc_id}"

    doc = settled(http, running.base_url, doc_id)
    assert doc["status"] == "stored", doc
    assert doc["media_type"] == media_type
    assert doc["size"] == len(body)
    assert doc["sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["filename"] == "delivery note.bin"
    assert doc["metadata"] == metadata
    assert doc["download_url"].startswith(running.base_url + f"/v1/files/{doc_id}?")

    got = http.get(doc["download_url"], headers=DRIVER, timeout=30)
    assert got.status_code == 200
    assert got.content == body
    assert got.headers["Content-Type"].startswith(media_type)

    pushes = wait_for(lambda: fcm.messages_for("phone-1"), what="the push")
    wait_for(lambda: (running.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
             == "completed", what="the delivery record")
    assert len(fcm.messages_for("phone-1")) == 1
    assert pushes[0]["data"] == {"document_id": doc_id, "status": "stored",
                                 "download_url": doc["download_url"]}
    assert pushes[0]["notification"]["title"] == "Document stored"


def test_redelivered_events_change_nothing_and_push_once(
    running: Running, http: requests.Session, fcm: FcmStub, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    register_device(http, running.base_url, "phone-dup")
    body = samples.pdf(samples.marker())
    doc_id = upload(http, running.base_url, body, "application/pdf").json()["id"]
    first = settled(http, running.base_url, doc_id)
    wait_for(lambda: fcm.messages_for("phone-dup"), what="the first push")
    record = running.svc.documents.get(doc_id)
    assert record is not None

    # The broker delivers document.uploaded twice more (same event id), as after a lost ack.
    uploaded = make_event(
        DOCUMENT_UPLOADED, running.svc.settings.event_source, doc_id,
        DocumentUploaded(document_id=doc_id, owner=record.owner, filename=record.filename,
                         declared_type=record.declared_type, size=record.size,
                         sha256=record.sha256),
        event_id=record.upload_event_id,
    )
    _publish_raw(running, uploaded)
    _publish_raw(running, uploaded)

    def deduplicated() -> bool:
        return sum("already completed" in r.getMessage() for r in caplog.records) >= 2

    # Each redelivery is re-announced with the same event id and swallowed by notification.
    wait_for(deduplicated, what="the duplicates to be handled")
    assert len(fcm.messages_for("phone-dup")) == 1
    again = settled(http, running.base_url, doc_id)
    assert again["status"] == "stored"
    assert again["sha256"] == first["sha256"]
    assert running.svc.blobs.exists(Area.OBJECTS, doc_id)


class _RefusesOutcomes:
    """The pipeline's publisher, except that it fails the storage outcome's event with
    ``error`` while ``refusing`` (the broker not confirming it, or the process dying)."""

    def __init__(self, inner: Any, error: Callable[[], BaseException]) -> None:
        self.inner = inner
        self.error = error
        self.refusing = True
        self.refused: list[str] = []

    def publish(self, event: Any) -> None:
        if self.refusing and event["type"] == DOCUMENT_STORED:
            self.refused.append(str(event["id"]))
            raise self.error()
        self.inner.publish(event)

    def close(self) -> None:
        self.inner.close()


def test_an_outcome_the_broker_refuses_is_published_by_the_relay_and_pushed_once(
    running: Running, http: requests.Session, fcm: FcmStub,
) -> None:
    register_device(http, running.base_url, "phone-refused")
    refusing = _RefusesOutcomes(running.svc.publisher, lambda: PublishError("not confirmed"))
    running.svc.publisher = refusing
    doc_id = upload(http, running.base_url, samples.pdf(samples.marker()),
                    "application/pdf").json()["id"]

    def outcome_in_outbox() -> bool:
        record = running.svc.documents.get(doc_id)
        return record is not None and [e["id"] for e in record.outbox] == [f"{doc_id}.stored"]

    wait_for(outcome_in_outbox, what="the refused outcome kept in the outbox")
    wait_for(lambda: len(refusing.refused) >= 2, what="the relay trying it too")
    assert fcm.messages_for("phone-refused") == []
    assert settled(http, running.base_url, doc_id)["status"] == "stored"
    refusing.refusing = False  # the broker is back
    wait_for(lambda: fcm.messages_for("phone-refused"), what="the push")
    wait_for(lambda: running.svc.documents.get(doc_id).outbox == [], what="an empty outbox")
    wait_for(lambda: (running.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
             == "completed", what="the delivery record")
    assert len(fcm.messages_for("phone-refused")) == 1


def test_storage_failing_before_its_outcome_is_published_announces_it_on_the_retry(
    running: Running, http: requests.Session, fcm: FcmStub,
) -> None:
    """The outcome's event has no outbox on the way: until it is published the event being
    handled is not acknowledged, so the storage handler runs again and announces it."""
    register_device(http, running.base_url, "phone-retry")
    failing = _RefusesOutcomes(running.svc.publisher, lambda: RuntimeError("process died"))
    running.svc.publisher = failing
    doc_id = upload(http, running.base_url, samples.pdf(samples.marker()),
                    "application/pdf").json()["id"]
    wait_for(lambda: failing.refused, what="the outcome's publish to fail")
    record = running.svc.documents.get(doc_id)
    assert record is not None
    assert (record.status.value, record.outbox) == ("stored", [])  # nothing for the relay
    failing.refusing = False
    pushes = wait_for(lambda: fcm.messages_for("phone-retry"), what="the push")
    assert pushes[0]["data"]["document_id"] == doc_id
    wait_for(lambda: (running.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
             == "completed", what="the delivery record")
    assert failing.refused == [f"{doc_id}.stored"]
    assert len(fcm.messages_for("phone-retry")) == 1


@pytest.mark.parametrize(
    ("body", "declared", "reason"),
    [
        (samples.png(), "application/pdf", "declared application/pdf but the content is image/png"),
        (b"\x00\x01 just some bytes " * 100, "image/jpeg", "content is of an unknown type"),
        (b"%PDF-1.7\n" + b"garbage " * 200, "application/pdf", "corrupt PDF"),
        (samples.jpeg()[:200], "image/jpeg", "corrupt image"),
    ],
    ids=["png-as-pdf", "unknown-bytes", "corrupt-pdf", "truncated-jpeg"],
)
def test_content_that_is_not_its_declared_type_is_rejected(
    running: Running, http: requests.Session, fcm: FcmStub,
    body: bytes, declared: str, reason: str,
) -> None:
    register_device(http, running.base_url, "phone-rej")
    resp = upload(http, running.base_url, body, declared)
    assert resp.status_code == 202
    doc_id = resp.json()["id"]
    doc = settled(http, running.base_url, doc_id)
    assert doc["status"] == "rejected"
    assert reason in doc["reason"]
    assert "download_url" not in doc
    push = wait_for(lambda: fcm.messages_for("phone-rej"), what="the rejection push")[0]
    assert push["data"]["status"] == "rejected"
    assert push["data"]["document_id"] == doc_id
    assert not running.svc.blobs.exists(Area.STAGING, doc_id)
    assert not running.svc.blobs.exists(Area.OBJECTS, doc_id)


def test_no_plaintext_rests_on_efs_data_dir_or_database(
    running: Running, http: requests.Session, mongo: object,
) -> None:
    mark = samples.marker()
    bodies = {
        "application/pdf": samples.pdf(mark, pages=2),
        "image/jpeg": samples.jpeg(mark, (300, 200)),
    }
    ids = []
    for media_type, body in bodies.items():
        assert mark in body  # the scan below looks for something that is really there
        ids.append(upload(http, running.base_url, body, media_type).json()["id"])
    for doc_id in ids:
        assert settled(http, running.base_url, doc_id)["status"] == "stored"
    running.svc.mongo.client.admin.command("fsync")

    roots = [running.svc.settings.data_dir, running.svc.settings.efs_root,
             mongo.storage]  # type: ignore[attr-defined]
    scanned = 0
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                scanned += 1
                assert mark not in path.read_bytes(), f"plaintext found in {path}"
    assert scanned > 3
    for doc_id in ids:
        raw = running.svc.documents.col.find_one({"_id": doc_id})
        assert mark not in repr(raw).encode()
        # the download link is kept sealed, not in the clear
        assert raw is not None
        assert b"/v1/files/" not in raw["download_url_enc"]


def _drain(resp: requests.Response, into: bytearray) -> None:
    for piece in resp.iter_content(65536):
        into += piece


def test_tampered_stored_chunk_fails_to_decrypt(running: Running, http: requests.Session) -> None:
    body = samples.pdf(samples.marker(), padding=300_000)  # several 64 KiB chunks
    doc_id = upload(http, running.base_url, body, "application/pdf").json()["id"]
    doc = settled(http, running.base_url, doc_id)
    assert doc["status"] == "stored"
    path = running.svc.blobs.path(Area.OBJECTS, doc_id)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))

    received = bytearray()
    with http.get(doc["download_url"], headers=DRIVER, stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            _drain(resp, received)
    # The chunks before the tampered one arrived; nothing after it did.
    assert 0 < len(received) < len(body)
    assert body.startswith(received)


def test_no_plaintext_in_broker_messages_or_any_collection(
    service_settings: Callable[..., Settings], http: requests.Session,
) -> None:
    """Events carry metadata only: the bytes stay in the encrypted object on EFS."""
    from bson import json_util

    with serving(service_settings, consumers=False) as run:
        mark = samples.marker()
        body = samples.pdf(mark)
        assert mark in body
        doc_id = upload(http, run.base_url, body, "application/pdf").json()["id"]
        settings = run.svc.settings
        conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url or ""))
        try:
            chan = conn.channel()
            _, props, message = wait_for(
                lambda: (r := chan.basic_get(topology.queue(settings.amqp_prefix, "storage")))
                and r[0] and r, what="the queued event")
            assert json.loads(message)["document_id"] == doc_id
            assert mark not in message
            assert mark not in repr(props.headers).encode()
        finally:
            conn.close()  # unacknowledged: the event goes back to its queue
        db = run.svc.mongo.db
        for name in db.list_collection_names():
            dump = json_util.dumps(list(db[name].find())).encode()
            assert mark not in dump, f"plaintext in the {name} collection"
