"""The access model on real services, for two drivers and one agent: who sees, lists,
changes, deletes and downloads what; links that cannot be abused; the audit trail."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from shared.blobstore import Area
from shared.config import Settings
from tests import samples
from tests.conftest import Running, serving
from tests.helpers import (
    AGENT,
    DRIVER,
    OTHER_DRIVER,
    kong,
    register_device,
    settled,
    upload,
    wait_for,
)

pytestmark = pytest.mark.services


@pytest.fixture
def run(service_settings: Callable[..., Settings]) -> Iterator[Running]:
    with serving(service_settings, link_grace_seconds=1) as running:
        yield running


def _stored(http: requests.Session, run: Running, who: dict[str, str], body: bytes,
            media_type: str = "application/pdf", **headers: str) -> dict[str, Any]:
    resp = upload(http, run.base_url, body, media_type, headers={**who, **headers})
    assert resp.status_code == 202, resp.text
    return settled(http, run.base_url, resp.json()["id"], headers=who)


def _ids(resp: requests.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [d["id"] for d in resp.json()["items"]]


def test_drivers_see_only_their_own_documents(run: Running, http: requests.Session) -> None:
    mine = [_stored(http, run, DRIVER, samples.pdf(samples.marker())) for _ in range(2)]
    theirs = _stored(http, run, OTHER_DRIVER, samples.jpeg(samples.marker()), "image/jpeg")
    url = run.url("/v1/documents")
    assert set(_ids(http.get(url, headers=DRIVER))) == {d["id"] for d in mine}
    assert _ids(http.get(url, headers=OTHER_DRIVER)) == [theirs["id"]]
    # asking for someone else's documents is refused, not silently answered
    assert http.get(url, params={"owner": "driver-2"}, headers=DRIVER).status_code == 403

    other = theirs["id"]
    for method, path, payload in [
        ("GET", f"/v1/documents/{other}", None),
        ("PATCH", f"/v1/documents/{other}", {"note": "x"}),
        ("DELETE", f"/v1/documents/{other}", None),
        ("POST", f"/v1/documents/{other}/link", None),
    ]:
        resp = http.request(method, run.url(path), headers=DRIVER, json=payload)
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "not_found"
    # a valid link is not enough: the other driver's identity gets 404 as well
    assert http.get(theirs["download_url"], headers=DRIVER).status_code == 404
    assert http.get(theirs["download_url"], headers=OTHER_DRIVER).status_code == 200
    assert run.svc.documents.get(other) is not None  # nothing was changed


def test_agent_lists_filters_and_pages_through_everything(
    run: Running, http: requests.Session,
) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    pdfs = [_stored(http, run, DRIVER, samples.pdf(samples.marker()),
                    **{"X-Filename": f"POD-{i}.pdf", "X-Document-Kind": "proof_of_delivery"})
            for i in range(3)]
    photo = _stored(http, run, OTHER_DRIVER, samples.jpeg(samples.marker()), "image/jpeg",
                    **{"X-Filename": "damaged pallet.jpg", "X-Document-Kind": "photo"})
    bad = upload(http, run.base_url, samples.png(), "application/pdf",
                 headers=OTHER_DRIVER).json()["id"]
    settled(http, run.base_url, bad, headers=OTHER_DRIVER)
    url = run.url("/v1/documents")
    every = _ids(http.get(url, headers=AGENT))
    assert every == [bad, photo["id"], *[d["id"] for d in reversed(pdfs)]]  # newest first

    def only(**params: str) -> list[str]:
        return _ids(http.get(url, params=params, headers=AGENT))

    assert only(owner="driver-2") == [bad, photo["id"]]
    assert only(status="rejected") == [bad]
    assert only(media_type="image/jpeg") == [photo["id"]]
    assert only(kind="photo") == [photo["id"]]
    assert only(q="pallet") == [photo["id"]]
    assert set(only(q="pod-")) == {d["id"] for d in pdfs}
    assert only(created_after=started.isoformat(), owner="driver-2", status="stored") == [
        photo["id"]]
    assert only(created_before=started.isoformat()) == []
    assert http.get(url, params={"status": "lost"}, headers=AGENT).status_code == 400
    assert http.get(url, params={"limit": "0"}, headers=AGENT).status_code == 400
    assert http.get(url, params={"cursor": "garbage!"}, headers=AGENT).status_code == 400

    # page by two; a document uploaded meanwhile neither repeats nor hides older ones
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = http.get(url, params=params, headers=AGENT).json()
        seen += [d["id"] for d in page["items"]]
        if not cursor:
            _stored(http, run, DRIVER, samples.pdf(samples.marker()))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == every


def test_agent_patches_deletes_and_the_audit_trail_shows_it(
    run: Running, http: requests.Session,
) -> None:
    doc = _stored(http, run, DRIVER, samples.pdf(samples.marker()))
    doc_url = run.url(f"/v1/documents/{doc['id']}")
    patch = {"kind": "bill_of_lading", "tags": ["urgent", "route-7"], "note": "signed by J."}
    assert http.patch(doc_url, json=patch, headers=DRIVER).status_code == 403
    resp = http.patch(doc_url, json=patch, headers={**AGENT, "X-Request-ID": "req-patch-1"})
    assert resp.status_code == 200, resp.text
    assert {k: resp.json()[k] for k in patch} == patch
    assert http.patch(doc_url, json={"kind": "novel"}, headers=AGENT).status_code == 400

    # the owner may not delete a stored document; an agent may
    assert http.delete(doc_url, headers=DRIVER).status_code == 403
    object_path = run.svc.blobs.path(Area.OBJECTS, doc["id"])
    assert object_path.exists()
    gone = http.delete(doc_url, headers={**AGENT, "X-Request-ID": "req-delete-1"})
    assert gone.status_code == 200
    assert gone.json()["status"] == "deleted"
    assert gone.json()["deleted_by"] == "agent-1"
    assert not object_path.exists()
    record = run.svc.documents.col.find_one({"_id": doc["id"]})
    assert record is not None
    assert record["wrapped_key"] is None
    assert "download_url_enc" not in record
    assert http.get(doc["download_url"], headers=DRIVER).status_code == 410
    assert http.get(doc["download_url"], headers=AGENT).status_code == 410
    assert http.delete(doc_url, headers=AGENT).status_code == 410
    assert doc["id"] not in _ids(http.get(run.url("/v1/documents"), headers=AGENT))

    # agents download anything, and that too is audited
    other = _stored(http, run, OTHER_DRIVER, samples.pdf(samples.marker()))
    assert http.get(other["download_url"], headers=AGENT).status_code == 200

    trail = http.get(run.url("/v1/audit"), headers=AGENT).json()["items"]
    assert [(e["action"], e["target_id"]) for e in trail] == [
        ("document.download", other["id"]),
        ("document.delete", doc["id"]),
        ("document.patch", doc["id"]),
    ]
    assert trail[1]["request_id"] == "req-delete-1"
    assert trail[2]["details"]["changes"] == patch
    by_doc = http.get(run.url("/v1/audit"), params={"document_id": doc["id"]},
                      headers=AGENT).json()["items"]
    assert [e["action"] for e in by_doc] == ["document.delete", "document.patch"]
    first = http.get(run.url("/v1/audit"), params={"limit": "1"}, headers=AGENT).json()
    rest = http.get(run.url("/v1/audit"), params={"cursor": first["next_cursor"]},
                    headers=AGENT).json()
    assert [e["id"] for e in first["items"] + rest["items"]] == [e["id"] for e in trail]
    assert http.get(run.url("/v1/audit"), headers=DRIVER).status_code == 403


def test_owner_may_delete_a_rejected_upload(run: Running, http: requests.Session) -> None:
    doc_id = upload(http, run.base_url, samples.png(), "application/pdf").json()["id"]
    assert settled(http, run.base_url, doc_id)["status"] == "rejected"
    resp = http.delete(run.url(f"/v1/documents/{doc_id}"), headers=DRIVER)
    assert resp.status_code == 200
    assert resp.json()["deleted_by"] == "driver-1"


def test_links_forged_expired_or_signed_with_a_retired_key_are_refused(
    run: Running, http: requests.Session,
) -> None:
    from shared.links import rotate_keyring

    doc = _stored(http, run, DRIVER, samples.pdf(samples.marker()))
    short = http.post(run.url(f"/v1/documents/{doc['id']}/link"), json={"expires_in": 1},
                      headers=DRIVER)
    assert short.status_code == 201
    assert http.get(short.json()["download_url"], headers=DRIVER).status_code == 200
    too_long = http.post(run.url(f"/v1/documents/{doc['id']}/link"),
                         json={"expires_in": 10**9}, headers=DRIVER)
    assert too_long.status_code == 400
    old_link = doc["download_url"]
    forged = old_link[: old_link.index("sig=") + 4] + "x" * 43

    # rotate the signing key, as `docproc keys rotate-link` does from another process: the
    # running server follows the keyring file. With a 1 s grace the old link dies while
    # still unexpired.
    new_key = rotate_keyring(run.svc.settings.keys_dir, grace_seconds=1)
    assert http.get(old_link, headers=DRIVER).status_code == 200  # within grace
    time.sleep(2.1)
    for link, codes in [(old_link, {"link_key_retired"}), (forged, {"invalid_link"}),
                        (short.json()["download_url"], {"link_key_retired", "link_expired"})]:
        resp = http.get(link, headers=DRIVER)
        assert resp.status_code == 403, link
        assert resp.json()["error"]["code"] in codes
    # the document's own link is signed again with the new key, not handed out dead
    current = http.get(run.url(f"/v1/documents/{doc['id']}"), headers=DRIVER).json()
    assert f"kid={new_key.kid}" in current["download_url"]
    assert http.get(current["download_url"], headers=DRIVER).status_code == 200
    fresh = http.post(run.url(f"/v1/documents/{doc['id']}/link"), headers=DRIVER).json()
    assert f"kid={new_key.kid}" in fresh["download_url"]
    assert http.get(fresh["download_url"], headers=DRIVER).status_code == 200


def test_short_link_expires(run: Running, http: requests.Session) -> None:
    doc = _stored(http, run, DRIVER, samples.pdf(samples.marker()))
    short = http.post(run.url(f"/v1/documents/{doc['id']}/link"), json={"expires_in": 1},
                      headers=DRIVER).json()
    time.sleep(2.1)
    resp = http.get(short["download_url"], headers=DRIVER)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "link_expired"


def test_disabled_user_is_refused_and_not_notified(
    run: Running, http: requests.Session, fcm: Any,
) -> None:
    http.post(run.url("/v1/users/me/devices"), json={"token": "ph-9", "platform": "ios"},
              headers=OTHER_DRIVER)
    doc = _stored(http, run, OTHER_DRIVER, samples.pdf(samples.marker()))
    wait_for(lambda: fcm.messages_for("ph-9"), what="the first push")
    resp = http.patch(run.url("/v1/users/driver-2"), json={"status": "disabled"},
                      headers=AGENT)
    assert resp.status_code == 200
    assert resp.json()["status"] == "disabled"
    for method, path in [("GET", "/v1/documents"), ("GET", f"/v1/documents/{doc['id']}"),
                         ("GET", "/v1/users/me"), ("POST", "/v1/documents")]:
        got = http.request(method, run.url(path), headers=OTHER_DRIVER, data=b"x")
        assert got.status_code == 403, (method, path)
        assert got.json()["error"]["code"] == "user_disabled"
    assert http.get(doc["download_url"], headers=OTHER_DRIVER).status_code == 403
    # a document of theirs finishing now announces nothing to their devices
    from events.catalog import DOCUMENT_STORED, DocumentStored
    from events.cloudevent import make_event

    late = make_event(DOCUMENT_STORED, "/tests", doc["id"], DocumentStored(
        document_id=doc["id"], owner="driver-2", filename="late.pdf",
        media_type="application/pdf", size=doc["size"], sha256=doc["sha256"],
        download_url=doc["download_url"], download_url_expires=0), event_id="late-1")
    run.svc.publish(late)
    done = wait_for(lambda: (run.svc.deliveries.get("late-1") or {}).get("outcome"),
                    what="the delivery record")
    assert done == {"devices": 0, "sent": 0, "unregistered": 0, "failed": 0}
    assert len(fcm.messages_for("ph-9")) == 1
    users = http.get(run.url("/v1/users"), params={"status": "disabled"}, headers=AGENT)
    assert [u["id"] for u in users.json()["items"]] == ["driver-2"]
    assert http.patch(run.url("/v1/users/agent-1"), json={"status": "disabled"},
                      headers=AGENT).status_code == 409
    assert http.patch(run.url("/v1/users/driver-2"), json={"status": "active"},
                      headers=AGENT).status_code == 200
    assert http.get(run.url("/v1/users/me"), headers=OTHER_DRIVER).status_code == 200
    actions = [e["action"] for e in http.get(run.url("/v1/audit"), params={"actor": "agent-1"},
                                             headers=AGENT).json()["items"]]
    assert actions == ["user.patch", "user.patch"]


def test_an_agent_restricted_to_driver_rights_loses_the_agent_view(
    run: Running, http: requests.Session,
) -> None:
    second_agent = kong("agent-2", "agents")
    assert http.get(run.url("/v1/users"), headers=second_agent).status_code == 200
    resp = http.patch(run.url("/v1/users/agent-2"), json={"role": "driver"}, headers=AGENT)
    assert resp.json()["role"] == "driver"
    assert resp.json()["kong_role"] == "agent"
    assert http.get(run.url("/v1/users"), headers=second_agent).status_code == 403
    # Registering a phone with driver rights leaves the Kong group on record as it is.
    register_device(http, run.base_url, "agent-2-phone", headers=second_agent)
    seen = http.get(run.url("/v1/users/agent-2"), headers=AGENT).json()
    assert (seen["role"], seen["kong_role"], len(seen["devices"])) == ("driver", "agent", 1)
    agents = http.get(run.url("/v1/users?role=agent"), headers=AGENT).json()["items"]
    assert "agent-2" in [u["id"] for u in agents]
    # nobody is raised above their Kong group
    http.get(run.url("/v1/users/me"), headers=DRIVER)
    raised = http.patch(run.url("/v1/users/driver-1"), json={"role": "agent"}, headers=AGENT)
    assert raised.json()["role"] == "driver"
    assert http.get(run.url("/v1/users"), headers=DRIVER).status_code == 403


def test_range_and_etag_follow_rfc_9110(run: Running, http: requests.Session) -> None:
    body = samples.pdf(samples.marker(), padding=200_000)
    doc = _stored(http, run, DRIVER, body)
    url = doc["download_url"]
    etag = f'"{hashlib.sha256(body).hexdigest()}"'

    full = http.get(url, headers=DRIVER)
    assert full.headers["ETag"] == etag
    assert full.headers["Accept-Ranges"] == "bytes"
    assert http.get(url, headers={**DRIVER, "If-None-Match": etag}).status_code == 304
    assert http.get(url, headers={**DRIVER, "If-None-Match": f"W/{etag}"}).status_code == 304
    assert http.get(url, headers={**DRIVER, "If-None-Match": '"other"'}).status_code == 200

    size = len(body)
    for header, start, stop in [
        ("bytes=0-99", 0, 100),
        ("bytes=65530-65545", 65530, 65546),     # across an envelope chunk boundary
        (f"bytes={size - 10}-", size - 10, size),
        ("bytes=-25", size - 25, size),
        (f"bytes=100-{size + 500}", 100, size),  # clipped to the end
    ]:
        part = http.get(url, headers={**DRIVER, "Range": header})
        assert part.status_code == 206, header
        assert part.content == body[start:stop], header
        assert part.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
        assert int(part.headers["Content-Length"]) == stop - start
    unsatisfiable = http.get(url, headers={**DRIVER, "Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{size}"
    # several ranges, or a stale If-Range: the whole document instead
    several = http.get(url, headers={**DRIVER, "Range": "bytes=0-1,5-6"})
    assert (several.status_code, several.content) == (200, body)
    stale = http.get(url, headers={**DRIVER, "Range": "bytes=0-9", "If-Range": '"old"'})
    assert (stale.status_code, stale.content) == (200, body)
    fresh = http.get(url, headers={**DRIVER, "Range": "bytes=0-9", "If-Range": etag})
    assert (fresh.status_code, fresh.content) == (206, body[:10])


def test_devices_are_listed_by_id_and_removed(run: Running, http: requests.Session) -> None:
    reg = http.post(run.url("/v1/users/me/devices"), json={"token": "tok-x", "platform": "web"},
                    headers=DRIVER).json()
    me = http.get(run.url("/v1/users/me"), headers=DRIVER).json()
    assert [d["id"] for d in me["devices"]] == [reg["id"]]
    assert "tok-x" not in str(me)  # the token itself is never echoed back
    path = run.url(f"/v1/users/me/devices/{reg['id']}")
    assert http.delete(path, headers=OTHER_DRIVER).status_code == 404
    assert http.delete(path, headers=DRIVER).status_code == 204
    assert http.delete(path, headers=DRIVER).status_code == 404
    assert http.get(run.url("/v1/users/me"), headers=DRIVER).json()["devices"] == []
