"""The HTTP contract Kong routes to: identity, validation, limits, idempotency, links.

Every refusal is a JSON error and leaves nothing behind: no staged object, no record."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymongo
import pytest
import requests

from events.publisher import AmqpPublisher
from shared.config import Settings
from tests import samples
from tests.conftest import Running, serving
from tests.helpers import AGENT, DRIVER, OTHER_DRIVER, kong, settled, upload, wait_for

pytestmark = pytest.mark.services

LIMIT = 64 * 1024


@pytest.fixture
def small(service_settings: Callable[..., Settings]) -> Iterator[Running]:
    with serving(service_settings, max_upload_bytes=LIMIT) as run:
        yield run


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _nothing_kept(run: Running) -> None:
    assert _files(run.svc.settings.efs_root) == []
    assert run.svc.documents.col.count_documents({}) == 0


def _error(resp: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthenticated"),
        ({"X-Consumer-Username": "driver-1"}, 401, "unauthenticated"),
        ({"X-Consumer-Groups": "drivers"}, 401, "unauthenticated"),
        (kong("driver-1", "contractors"), 403, "forbidden"),
    ],
)
def test_missing_or_unknown_identity_is_refused(
    small: Running, http: requests.Session, headers: dict[str, str], status: int, code: str,
) -> None:
    resp = http.post(small.url("/v1/documents"), data=samples.pdf(), timeout=10,
                     headers={**headers, "Content-Type": "application/pdf"})
    _error(resp, status, code)
    _error(http.get(small.url("/v1/documents/" + "a" * 32), headers=headers, timeout=10),
           status, code)
    _nothing_kept(small)


def test_bad_uploads_get_clear_errors_and_leave_nothing(
    small: Running, http: requests.Session,
) -> None:
    base = small.base_url
    _error(upload(http, base, b"", "application/pdf"), 400, "empty_document")
    _error(upload(http, base, b"hello", "text/plain"), 415, "unsupported_media_type")
    resp = http.post(base + "/v1/documents", data=b"x", headers=DRIVER, timeout=10)
    _error(resp, 415, "unsupported_media_type")
    # over the limit by Content-Length: refused before reading
    _error(upload(http, base, b"\0" * (LIMIT + 1), "application/pdf"), 413, "too_large")

    # over the limit with no Content-Length (chunked): the server stops reading and drops it
    def chunks() -> Iterator[bytes]:
        for _ in range(LIMIT // 4096 + 2):
            yield b"\0" * 4096

    resp = http.post(base + "/v1/documents", data=chunks(), timeout=30,
                     headers={**DRIVER, "Content-Type": "application/pdf"})
    _error(resp, 413, "too_large")
    _nothing_kept(small)


def test_multipart_upload_streams_the_file_part(small: Running, http: requests.Session) -> None:
    body = samples.pdf(samples.marker(), pages=2)
    resp = http.post(small.url("/v1/documents"), headers=DRIVER, timeout=30, files={
        "file": ("pod 17.pdf", body, "application/pdf")}, data={"note": "left at door"})
    assert resp.status_code == 202, resp.text
    doc = settled(http, small.base_url, resp.json()["id"])
    assert doc["status"] == "stored"
    assert doc["filename"] == "pod 17.pdf"
    assert doc["size"] == len(body)
    assert http.get(doc["download_url"], headers=DRIVER, timeout=30).content == body


def test_bad_multipart_uploads_are_refused(small: Running, http: requests.Session) -> None:
    url = small.url("/v1/documents")
    resp = http.post(url, headers=DRIVER, timeout=10,
                     files={"file": ("a.exe", b"MZ...", "application/x-msdownload")})
    _error(resp, 415, "unsupported_media_type")
    resp = http.post(url, headers=DRIVER, timeout=10, files={"other": ("a.pdf", b"%PDF")})
    _error(resp, 400, "bad_request")
    resp = http.post(url, headers=DRIVER, timeout=10,
                     files={"file": ("big.pdf", b"\0" * (LIMIT + 10), "application/pdf")})
    _error(resp, 413, "too_large")
    resp = http.post(url, data=b"--nope\r\n", timeout=10, headers={
        **DRIVER, "Content-Type": "multipart/form-data; boundary=xyz"})
    _error(resp, 400, "malformed_multipart")
    resp = http.post(url, data=b"--nope\r\n", timeout=10, headers={
        **DRIVER, "Content-Type": "multipart/form-data"})
    _error(resp, 400, "malformed_multipart")
    _nothing_kept(small)


def test_a_multipart_body_cut_before_its_closing_delimiter_is_refused(
    small: Running, http: requests.Session,
) -> None:
    """The parser keeps a part's last bytes until it knows they are not a delimiter, and
    says nothing when the body simply ends: without the closing delimiter the document
    would be recorded short of its tail, with the hash of what was kept."""
    body = samples.pdf(samples.marker())
    head = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pdf\"\r\n"
            b"Content-Type: application/pdf\r\n\r\n")
    for cut in (head + body, head + body + b"\r\n--B",
                head + body + b"\r\n--B\r\nContent-Disposition: form-data; name=\"kind\""
                b"\r\n\r\nphoto"):
        resp = http.post(small.url("/v1/documents"), data=cut, timeout=10, headers={
            **DRIVER, "Content-Type": "multipart/form-data; boundary=B"})
        _error(resp, 400, "incomplete_body")
    _nothing_kept(small)
    whole = head + body + b"\r\n--B--\r\n"
    resp = http.post(small.url("/v1/documents"), data=whole, timeout=10, headers={
        **DRIVER, "Content-Type": "multipart/form-data; boundary=B"})
    assert resp.status_code == 202, resp.text
    assert settled(http, small.base_url, resp.json()["id"])["size"] == len(body)


def test_a_document_at_the_limit_is_accepted_in_a_multipart_body_too(
    small: Running, http: requests.Session,
) -> None:
    body = samples.pdf(samples.marker())
    body += b"%" + b"\0" * (LIMIT - len(body) - 1)  # padding after the PDF's end
    assert len(body) == LIMIT
    resp = http.post(small.url("/v1/documents"), headers=DRIVER, timeout=30,
                     files={"file": ("limit.pdf", body, "application/pdf")})
    assert resp.status_code == 202, resp.text
    _error(http.post(small.url("/v1/documents"), headers=DRIVER, timeout=30,
                     files={"file": ("over.pdf", body + b"\0", "application/pdf")}),
           413, "too_large")


def test_a_multipart_body_is_limited_as_a_whole(small: Running, http: requests.Session) -> None:
    """Parts nobody reads are not the document, but they are still body: sent chunked,
    with no Content-Length to refuse early, they stop at the limit and its framing."""

    def chunks() -> Iterator[bytes]:
        yield b"--B\r\nContent-Disposition: form-data; name=\"padding\"\r\n\r\n"
        for _ in range(3 * LIMIT // 4096):
            yield b"p" * 4096
        yield (b"\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; "
               b"filename=\"a.pdf\"\r\nContent-Type: application/pdf\r\n\r\n")
        yield samples.pdf(samples.marker()) + b"\r\n--B--\r\n"

    resp = http.post(small.url("/v1/documents"), data=chunks(), timeout=30, headers={
        **DRIVER, "Content-Type": "multipart/form-data; boundary=B"})
    _error(resp, 413, "too_large")
    _nothing_kept(small)


def test_odd_queries_and_bodies_are_400s_and_corrupt_nothing(
    small: Running, http: requests.Session,
) -> None:
    """Each of these once gave a 500, and an explicit null in a PATCH stored a value the
    records cannot hold, after which every read of that record gave a 500 too."""
    import base64
    import json

    doc_id = upload(http, small.base_url, samples.pdf(samples.marker()), "application/pdf"
                    ).json()["id"]
    http.get(small.url("/v1/users/me"), headers=DRIVER, timeout=10)  # provisions driver-1
    for method, path, body, code in [
        ("PATCH", f"/v1/documents/{doc_id}", {"tags": None}, "invalid_body"),
        ("PATCH", "/v1/users/driver-1", {"status": None}, "invalid_body"),
        ("PATCH", "/v1/users/driver-1", {"role": None}, "invalid_body"),
    ]:
        _error(http.request(method, small.url(path), json=body, headers=AGENT, timeout=10),
               400, code)
    deep = "[" * 50_000
    for path in (f"/v1/documents/{doc_id}", "/v1/users/driver-1"):
        _error(http.patch(small.url(path), data=deep, timeout=10,
                          headers={**AGENT, "Content-Type": "application/json"}),
               400, "invalid_json")
    forged = base64.urlsafe_b64encode(json.dumps(
        ["0001-01-01T00:00:00+05:00", "x"]).encode()).decode().rstrip("=")
    for path, params, code in [
        ("/v1/documents", {"limit": "\u00b2"}, "invalid_query"),
        ("/v1/users", {"limit": "\u00b2"}, "invalid_query"),
        ("/v1/audit", {"limit": "\u00b2"}, "invalid_query"),
        ("/v1/documents", {"created_after": "0001-01-01T00:00:00+01:00"}, "invalid_query"),
        ("/v1/documents", {"created_before": "9999-12-31T23:59:59-05:00"}, "invalid_query"),
        ("/v1/documents", {"cursor": forged}, "invalid_cursor"),
        ("/v1/audit", {"cursor": forged}, "invalid_cursor"),
    ]:
        _error(http.get(small.url(path), params=params, headers=AGENT, timeout=10), 400, code)
    # the records are as they were, and readable
    assert http.get(small.url(f"/v1/documents/{doc_id}"), headers=AGENT).json()["tags"] == []
    me = http.get(small.url("/v1/users/me"), headers=DRIVER, timeout=10)
    assert (me.status_code, me.json()["status"]) == (200, "active")
    cleared = http.patch(small.url(f"/v1/documents/{doc_id}"), json={"tags": [], "note": None},
                         headers=AGENT, timeout=10)
    assert cleared.status_code == 200, cleared.text
    assert http.get(small.url("/v1/documents"), headers=AGENT, timeout=10).status_code == 200


def test_idempotency_key_returns_the_first_document(small: Running, http: requests.Session) -> None:
    body = samples.pdf()
    key = {"Idempotency-Key": "upload-42"}
    first = upload(http, small.base_url, body, "application/pdf", headers={**DRIVER, **key})
    again = upload(http, small.base_url, body, "application/pdf", headers={**DRIVER, **key})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    # the key is per user: another driver's upload with the same key is their own document
    other = upload(http, small.base_url, body, "application/pdf",
                   headers={**OTHER_DRIVER, **key})
    assert other.json()["id"] != first.json()["id"]
    assert small.svc.documents.col.count_documents({}) == 2
    settled(http, small.base_url, first.json()["id"])
    staged = _files(small.svc.settings.efs_root / "staging")
    stored = _files(small.svc.settings.efs_root / "objects")
    settled(http, small.base_url, other.json()["id"], headers=OTHER_DRIVER)
    assert len(_files(small.svc.settings.efs_root / "objects")) == 2
    assert len(staged) + len(stored) <= 2


def test_status_and_download_respect_ownership_and_links(
    small: Running, http: requests.Session,
) -> None:
    body = samples.jpeg(samples.marker())
    doc_id = upload(http, small.base_url, body, "image/jpeg").json()["id"]
    doc = settled(http, small.base_url, doc_id)
    url = doc["download_url"]

    _error(http.get(small.url(f"/v1/documents/{doc_id}"), headers=OTHER_DRIVER, timeout=10),
           404, "not_found")
    assert http.get(small.url(f"/v1/documents/{doc_id}"), headers=AGENT, timeout=10).ok
    _error(http.get(small.url("/v1/documents/" + "0" * 32), headers=DRIVER, timeout=10),
           404, "not_found")
    _error(http.get(small.url("/v1/documents/..%2f..%2fetc"), headers=DRIVER, timeout=10),
           404, "not_found")

    _error(http.get(url, timeout=10), 401, "unauthenticated")
    _error(http.get(url, headers=OTHER_DRIVER, timeout=10), 404, "not_found")
    assert http.get(url, headers=AGENT, timeout=10).content == body
    forged = url[: url.index("sig=") + 4] + "A" * 43
    _error(http.get(forged, headers=DRIVER, timeout=10), 403, "invalid_link")
    stretched = url.replace("exp=", "exp=9")
    _error(http.get(stretched, headers=DRIVER, timeout=10), 403, "invalid_link")
    _error(http.get(url.split("?")[0], headers=DRIVER, timeout=10), 403, "invalid_link")
    expired = small.svc.links.sign(doc_id, -60).url
    _error(http.get(expired, headers=DRIVER, timeout=10), 403, "link_expired")

    got = http.get(url, headers=DRIVER, timeout=10)
    assert got.content == body
    assert got.headers["Content-Disposition"].startswith("attachment;")
    assert got.headers["X-Content-Type-Options"] == "nosniff"


def test_hostile_file_names_are_kept_as_harmless_metadata(
    small: Running, http: requests.Session,
) -> None:
    name = "../../etc/\u202egpj.exe\x07" + "x" * 5000 + ".pdf"
    resp = http.post(small.url("/v1/documents"), data=samples.pdf(), timeout=10, headers={
        **DRIVER, "Content-Type": "application/pdf", "X-Filename": quote(name)})
    assert resp.status_code == 202
    doc = settled(http, small.base_url, resp.json()["id"])
    assert "/" not in doc["filename"]
    assert "\u202e" not in doc["filename"]
    assert "\x07" not in doc["filename"]
    assert doc["filename"].endswith(".pdf")
    assert len(doc["filename"].encode()) <= 255
    for path in _files(small.svc.settings.efs_root):
        assert path.name == doc["id"]


def test_device_registration_is_idempotent_and_validated(
    small: Running, http: requests.Session,
) -> None:
    url = small.url("/v1/users/me/devices")
    device = {"token": "fcm-token-1", "platform": "ios"}
    assert http.post(url, json=device, headers=DRIVER, timeout=10).status_code == 201
    assert http.post(url, json=device, headers=DRIVER, timeout=10).status_code == 200
    user = small.svc.users.get("driver-1")
    assert user is not None
    assert [d.token for d in user.devices] == ["fcm-token-1"]
    _error(http.post(url, json={"token": "t", "platform": "symbian"}, headers=DRIVER,
                     timeout=10), 400, "invalid_body")
    _error(http.post(url, data="{", headers={**DRIVER, "Content-Type": "application/json"},
                     timeout=10), 400, "invalid_json")
    _error(http.post(url, json=device, timeout=10), 401, "unauthenticated")
    me = http.get(small.url("/v1/users/me"), headers=DRIVER, timeout=10).json()
    assert me["role"] == "driver"
    assert len(me["devices"]) == 1


def test_broker_down_at_upload_is_accepted_and_published_later(
    small: Running, http: requests.Session,
) -> None:
    """The record and its event are one write: with the broker away the upload is still
    accepted, and the outbox relay publishes the event once the broker is back."""
    working = small.svc.publisher
    small.svc.publisher = AmqpPublisher("amqp://guest:guest@127.0.0.1:1/%2F", "nowhere", (1.0,))
    try:
        resp = upload(http, small.base_url, samples.pdf(), "application/pdf")
        assert resp.status_code == 202
        doc_id = resp.json()["id"]
        record = small.svc.documents.get(doc_id)
        assert record is not None
        assert [e["id"] for e in record.outbox] == [record.upload_event_id]
        time.sleep(1.0)  # the relay tries too, and fails as well
        assert small.svc.documents.get(doc_id).status.value == "processing"
    finally:
        small.svc.publisher = working
    assert settled(http, small.base_url, doc_id)["status"] == "stored"
    # storage's outcome empties the outbox, and announces itself without one
    wait_for(lambda: small.svc.documents.get(doc_id).outbox == [], what="an empty outbox")


def test_database_down_at_upload_is_503_and_keeps_nothing(
    small: Running, http: requests.Session,
) -> None:
    from shared.documents import DocumentRepository

    working = small.svc.documents
    dead: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        "mongodb://127.0.0.1:1/", serverSelectionTimeoutMS=300)
    small.svc.documents = DocumentRepository(dead["docproc"])
    try:
        resp = upload(http, small.base_url, samples.pdf(), "application/pdf")
    finally:
        small.svc.documents = working
        dead.close()
    _error(resp, 503, "unavailable")
    assert resp.headers["Retry-After"]
    _nothing_kept(small)


@pytest.mark.parametrize("write_twice", [False, True])
def test_an_upload_recorded_despite_a_failed_write_keeps_its_object(
    running: Running, http: requests.Session, write_twice: bool,
) -> None:
    """The insert reaches the database but its answer does not (a connection lost on the
    way back), or is sent again and meets its own record: the upload is accepted and its
    staged object stays, for the outbox relay's event and storage to find."""
    from pymongo.errors import AutoReconnect

    repo = running.svc.documents
    real_insert = repo.insert

    def answer_lost(doc: Any, event: Any = None) -> None:
        real_insert(doc, event)
        if write_twice:
            real_insert(doc, event)  # meets its own record: DuplicateContent
        raise AutoReconnect("connection closed before the reply")

    repo.insert = answer_lost
    try:
        resp = upload(http, running.base_url, samples.pdf(samples.marker()), "application/pdf")
    finally:
        del repo.insert
    assert resp.status_code == 202, resp.text
    # the outbox relay publishes the event the failed request never sent
    doc = settled(http, running.base_url, resp.json()["id"])
    assert doc["status"] == "stored"
    assert http.get(doc["download_url"], headers=DRIVER).status_code == 200


def test_upload_cut_short_keeps_nothing(small: Running) -> None:
    import socket

    host, port = small.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Type: application/pdf\r\n"
            b"X-Consumer-Username: driver-1\r\nX-Consumer-Groups: drivers\r\n"
            b"Content-Length: 60000\r\n\r\n" + b"%PDF-1.7\n" + b"\0" * 20000)
        sock.shutdown(socket.SHUT_WR)  # the client goes away mid-body
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"incomplete_body" in answer
    _nothing_kept(small)


def test_same_bytes_from_the_same_driver_return_the_existing_document(
    small: Running, http: requests.Session,
) -> None:
    body = samples.pdf(samples.marker())
    first = upload(http, small.base_url, body, "application/pdf")
    assert first.status_code == 202
    again = upload(http, small.base_url, body, "application/pdf", filename="again.pdf")
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = upload(http, small.base_url, body, "application/pdf", headers=OTHER_DRIVER)
    assert other.status_code == 202  # another driver's copy is their own document
    assert small.svc.documents.col.count_documents({"owner": "driver-1"}) == 1
    settled(http, small.base_url, first.json()["id"])
    staged = [p for p in (small.svc.settings.efs_root / "staging").rglob("*") if p.is_file()]
    assert staged == [] or [p.name for p in staged] == [other.json()["id"]]


def test_a_double_tap_records_one_document(small: Running) -> None:
    body = samples.pdf(samples.marker())
    taps = 6
    start = threading.Barrier(taps)
    answers: list[requests.Response] = []

    def tap() -> None:
        with requests.Session() as own:
            start.wait()
            answers.append(upload(own, small.base_url, body, "application/pdf"))

    threads = [threading.Thread(target=tap) for _ in range(taps)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(a.status_code for a in answers) == [200] * (taps - 1) + [202]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert small.svc.documents.col.count_documents({}) == 1
    with requests.Session() as http:
        doc_id = ids.pop()
        assert settled(http, small.base_url, doc_id)["status"] == "stored"
        # The losers' staged copies are gone; only the one document's object is kept.
        assert [p.name for p in _files(small.svc.settings.efs_root)] == [doc_id]
        # Once it is deleted, the same bytes are a new document.
        assert http.delete(small.url(f"/v1/documents/{doc_id}"), headers=AGENT,
                           timeout=10).status_code == 200
        again = upload(http, small.base_url, body, "application/pdf")
        assert again.status_code == 202
        assert again.json()["id"] != doc_id


def test_identity_headers_without_the_gateway_secret_are_refused(
    service_settings: Callable[..., Settings], http: requests.Session,
) -> None:
    secret = "kong-to-docproc-" + "s" * 16
    with serving(service_settings, gateway_secret=secret) as run:
        forged = upload(http, run.base_url, samples.pdf(), "application/pdf")
        _error(forged, 401, "unauthenticated")
        wrong = upload(http, run.base_url, samples.pdf(), "application/pdf",
                       headers={**DRIVER, "X-Gateway-Secret": "guess"})
        _error(wrong, 401, "unauthenticated")
        through_kong = upload(http, run.base_url, samples.pdf(), "application/pdf",
                              headers={**DRIVER, "X-Gateway-Secret": secret})
        assert through_kong.status_code == 202
        assert http.get(run.url("/healthz")).status_code == 200  # probes need no secret
        assert run.svc.documents.col.count_documents({}) == 1
