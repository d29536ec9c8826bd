"""Backups (docproc/backup/) of a running pipeline on the real services, restored into a
second, independent installation on the same servers; to a local directory and to S3 (moto
stands in for S3 only: RabbitMQ, Redis and the MongoDB wire server stay real)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pika
import pymongo
import pytest
import requests
from moto import mock_aws

from docproc.backup import (
    COLLECTIONS,
    BackupError,
    RestoreRefused,
    create_backup,
    list_backups,
    restore_backup,
    verify_backup,
)
from events import topology
from shared.blobstore import Area
from shared.config import Settings
from tests import samples
from tests.conftest import FAST_RETRIES, Running, serving
from tests.helpers import AGENT, DRIVER, register_device, settled, upload, wait_for
from tests.services import MongoServer, purge_redis, unique

pytestmark = pytest.mark.services

MakeInstall = Callable[..., dict[str, Any]]


@pytest.fixture
def other_installation(
    tmp_path: Path, amqp_url: str, redis_url: str, mongo: MongoServer,
) -> Iterator[MakeInstall]:
    """Overrides for further installations on the same servers, each with its own data dir
    (so its own EFS root and keyring), database, exchange and queues, and Redis keys.

    ``service_settings`` only removes its own namespace, so these are removed here.
    """
    prefixes: list[str] = []

    def make(keys_from: Path | None = None) -> dict[str, Any]:
        prefix = unique("docproc-restore-")
        prefixes.append(prefix)
        data_dir = tmp_path / prefix
        if keys_from is not None:
            # Before the installation first starts, or it would generate a keyring of its own.
            shutil.copytree(keys_from, data_dir / "keys")
        return {"data_dir": data_dir, "mongodb_database": prefix.replace("-", "_"),
                "amqp_prefix": prefix, "redis_prefix": prefix + ":"}

    yield make
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo.uri)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for prefix in prefixes:
            topology.delete(conn.channel(), prefix, FAST_RETRIES)
            purge_redis(redis_url, prefix + ":")
            client.drop_database(prefix.replace("-", "_"))
    finally:
        conn.close()
        client.close()


@dataclass
class Contents:
    stored: dict[str, bytes] = field(default_factory=dict)  # id -> the uploaded bytes
    rejected: str = ""
    deleted: str = ""
    mark: bytes = b""


def populate(run: Running, http: requests.Session) -> Contents:
    """A PDF and a JPEG stored, one upload rejected, one stored and then deleted by an agent."""
    base = run.base_url
    out = Contents(mark=samples.marker())
    register_device(http, base, "phone-backup")
    for media_type, body in [("application/pdf", samples.pdf(out.mark, pages=2)),
                             ("image/jpeg", samples.jpeg(out.mark, (80, 60)))]:
        resp = upload(http, base, body, media_type, f"delivery.{media_type[-4:]}")
        assert resp.status_code == 202, resp.text
        out.stored[resp.json()["id"]] = body
    out.rejected = upload(http, base, samples.png(), "application/pdf").json()["id"]
    out.deleted = upload(http, base, samples.pdf(out.mark), "application/pdf").json()["id"]
    for doc_id in out.stored:
        assert settled(http, base, doc_id)["status"] == "stored"
    assert settled(http, base, out.rejected)["status"] == "rejected"
    assert settled(http, base, out.deleted)["status"] == "stored"
    gone = http.delete(f"{base}/v1/documents/{out.deleted}", headers=AGENT, timeout=10)
    assert gone.status_code == 200, gone.text
    # Every outcome announced, so the pipeline is idle and the counts below are exact.
    wait_for(lambda: run.svc.deliveries.col.count_documents({"state": "completed"}) == 4,
             what="the four notifications")
    outboxes_emptied(run)
    return out


def outboxes_emptied(run: Running) -> None:
    """Wait for every confirmed event's mark: they are written in batches, a little after the
    outcome, and a record compared before and after must not change in between."""
    wait_for(lambda: run.svc.documents.col.count_documents({"outbox_due": {"$exists": True}})
             == 0, what="empty outboxes")


def records(svc: Any) -> dict[str, list[dict[str, Any]]]:
    cols = {"documents": svc.documents.col, "users": svc.users.col, "audit": svc.audit.col,
            "deliveries": svc.deliveries.col}
    return {name: list(cols[name].find({}, sort=[("_id", 1)])) for name in COLLECTIONS}


def without_links(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items()
             if k not in ("download_url_enc", "download_url_expires")} for r in rows]


def assert_downloads(run: Running, http: requests.Session, contents: Contents) -> None:
    """Every stored document comes back byte-identical through ``run``'s own links."""
    for doc_id, body in contents.stored.items():
        doc = http.get(run.url(f"/v1/documents/{doc_id}"), headers=DRIVER, timeout=10).json()
        assert doc["status"] == "stored"
        assert doc["download_url"].startswith(run.base_url + "/v1/files/")
        got = http.get(doc["download_url"], headers=DRIVER, timeout=30)
        assert got.status_code == 200, got.text
        assert got.content == body
    gone = http.get(run.url(f"/v1/documents/{contents.deleted}"), headers=AGENT, timeout=10)
    assert gone.json()["status"] == "deleted"
    rejected = http.get(run.url(f"/v1/documents/{contents.rejected}"), headers=DRIVER,
                        timeout=10)
    assert rejected.json()["status"] == "rejected"


def test_backup_verify_list_and_restore_into_a_fresh_installation(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
) -> None:
    dest = tmp_path / "backups"
    with serving(service_settings) as run, requests.Session() as http:
        contents = populate(run, http)
        messages: list[str] = []
        manifest = create_backup(run.svc, str(dest), progress=messages.append)
        original = records(run.svc)
        key_id = run.svc.keys.active_key_id()
        keys_dir = run.svc.settings.keys_dir

        report = verify_backup(run.svc, manifest.location)
        assert report.ok, str(report)
        assert report.sealed
        assert "seal holds" in str(report)
        assert report.objects_decrypted == 2
        assert report.checksums_verified == len(manifest.files) == 6

    # The manifest: what is in the backup, and which KEK it needs.
    assert messages[-1] == f"backup {manifest.backup_id} complete"
    assert manifest.location == str(dest / manifest.backup_id)
    assert manifest.collections == {name: len(original[name]) for name in COLLECTIONS}
    assert manifest.collections["documents"] == 4
    assert manifest.documents_by_status == {"stored": 2, "rejected": 1, "deleted": 1}
    assert manifest.key_provider == "local"
    # the deleted document's key was destroyed: it needs no KEK any more
    assert [(k.provider, k.key_id, k.documents) for k in manifest.keys_in_use] == [
        ("local", key_id, 3)]
    assert manifest.missing_objects == []
    assert sorted(f.path for f in manifest.objects) == sorted(
        f"efs/objects/{i[:2]}/{i[2:4]}/{i}" for i in contents.stored)
    assert manifest.backup_id in str(manifest)
    assert key_id in str(manifest)

    # On disk: the manifest is the file, the checksums hold, and nothing is plaintext.
    backup = Path(manifest.location)
    on_disk = json.loads((backup / "manifest.json").read_text())
    assert on_disk["format_version"] == 2
    assert on_disk["seal"]["key"]["key_id"] == key_id
    assert on_disk["backup_id"] == manifest.backup_id
    assert on_disk["keys"]["in_use"] == [{"provider": "local", "key_id": key_id,
                                          "documents": 3}]
    for entry in manifest.files:
        data = (backup / entry.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)
    for path in backup.rglob("*"):
        if path.is_file():
            assert contents.mark not in path.read_bytes(), f"plaintext in {path}"
    assert not list(backup.rglob("*.tmp"))

    listed = list_backups(str(dest))
    assert [(s.backup_id, s.complete) for s in listed] == [(manifest.backup_id, True)]
    assert (listed[0].documents, listed[0].objects) == (4, 2)
    assert listed[0].key_ids == (key_id,)
    assert manifest.backup_id in str(listed[0])

    # A second installation: its own database, EFS root and queues, the original's keys.
    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh, \
            requests.Session() as http:
        assert fresh.svc.settings.efs_root != run.svc.settings.efs_root
        restored = restore_backup(fresh.svc, manifest.location)
        assert not restored.unsealed
        assert restored.collections == manifest.collections
        assert restored.objects == 2
        assert restored.links_reset == 2  # the two stored documents had cached links
        assert manifest.backup_id in str(restored)

        # Records come back exactly (dates, binary, integer types), minus the cached links
        # that named the original's host.
        again = records(fresh.svc)
        for name in COLLECTIONS:
            assert without_links(again[name]) == without_links(original[name]), name
        # The restore recreates the indexes (those SecantusDB's planner uses, see
        # DocumentRepository.ensure_indexes).
        assert set(fresh.svc.documents.col.index_information()) == {
            "_id_", "idempotency_slot", "content_slot", "outbox_due"}
        for doc_id in contents.stored:
            restored_file = fresh.svc.blobs.path(Area.OBJECTS, doc_id).read_bytes()
            entry = next(f for f in manifest.objects if f.path.endswith(doc_id))
            assert hashlib.sha256(restored_file).hexdigest() == entry.sha256

        assert_downloads(fresh, http, contents)


def test_restore_is_refused_into_a_used_installation_or_without_the_keys(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
) -> None:
    dest = tmp_path / "backups"
    with serving(service_settings) as run, requests.Session() as http:
        populate(run, http)
        manifest = create_backup(run.svc, str(dest))
        key_id = run.svc.keys.active_key_id()
        before = records(run.svc)
        with pytest.raises(RestoreRefused, match="not empty") as refused:
            restore_backup(run.svc, manifest.location)
        assert "'documents'" in str(refused.value)
        assert records(run.svc) == before

    # An installation with a keyring of its own cannot read the backup: refused up front,
    # naming the KEK it would need, and nothing written.
    with serving(service_settings, **other_installation()) as stranger:
        with pytest.raises(RestoreRefused, match=key_id) as refused:
            restore_backup(stranger.svc, manifest.location)
        assert "keys directory" in str(refused.value)
        assert all(rows == [] for rows in records(stranger.svc).values())
        assert not any(Path(stranger.svc.blobs.root, "objects").rglob("*"))


def test_a_restore_failing_partway_through_an_insert_leaves_the_target_empty(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database takes half of a batch of records and then the connection drops: the
    roll-back removes those too, so the next try is not refused as "not empty"."""
    with serving(service_settings) as run, requests.Session() as http:
        populate(run, http)
        manifest = create_backup(run.svc, str(tmp_path / "backups"))
        keys_dir = run.svc.settings.keys_dir
    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh:
        documents = fresh.svc.documents.col
        real_insert_many = pymongo.collection.Collection.insert_many

        def half_then_drop(col: Any, batch: list[dict[str, Any]], *args: Any,
                           **kwargs: Any) -> Any:
            if col.name == documents.name and len(batch) > 1:
                real_insert_many(col, batch[: len(batch) // 2], *args, **kwargs)
                raise pymongo.errors.AutoReconnect("connection closed")
            return real_insert_many(col, batch, *args, **kwargs)

        monkeypatch.setattr(pymongo.collection.Collection, "insert_many", half_then_drop)
        with pytest.raises(pymongo.errors.AutoReconnect):
            restore_backup(fresh.svc, manifest.location)
        monkeypatch.undo()
        assert all(rows == [] for rows in records(fresh.svc).values())
        assert not any(p.is_file() for p in Path(fresh.svc.blobs.root, "objects").rglob("*"))
        restore_backup(fresh.svc, manifest.location)  # the next try goes through
        assert documents.count_documents({}) > 1


def test_a_backup_from_before_the_slots_answers_repeats_once_restored(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
) -> None:
    body = samples.pdf(samples.marker())
    body_sha256 = hashlib.sha256(body).hexdigest()
    with serving(service_settings) as run, requests.Session() as http:
        doc_id = upload(http, run.base_url, body, "application/pdf").json()["id"]
        assert settled(http, run.base_url, doc_id)["status"] == "stored"
        outboxes_emptied(run)
        # As versions before the slots wrote their records.
        run.svc.documents.col.update_many({}, {"$unset": {"content_slot": ""}})
        manifest = create_backup(run.svc, str(tmp_path / "backups"))
        keys_dir = run.svc.settings.keys_dir
    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh, \
            requests.Session() as http:
        restore_backup(fresh.svc, manifest.location)
        assert fresh.svc.documents.live_with_content("driver-1", body_sha256) is not None
        again = upload(http, fresh.base_url, body, "application/pdf")
        assert (again.status_code, again.json()["id"]) == (200, doc_id)


def test_tampered_backup_fails_verify_and_restore_naming_the_file(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
) -> None:
    dest = tmp_path / "backups"
    with serving(service_settings) as run, requests.Session() as http:
        contents = populate(run, http)
        manifest = create_backup(run.svc, str(dest))
        keys_dir = run.svc.settings.keys_dir
        backup = Path(manifest.location)

        victim = next(iter(contents.stored))
        obj = f"efs/objects/{victim[:2]}/{victim[2:4]}/{victim}"
        blob = bytearray((backup / obj).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (backup / obj).write_bytes(bytes(blob))

        report = verify_backup(run.svc, manifest.location)
        assert not report.ok
        assert {p.path for p in report.problems} == {obj}
        assert sorted(p.message for p in report.problems) == [
            "SHA-256 does not match the manifest (altered or corrupt)",
            "does not decrypt: chunk 0 failed authentication",
        ]
        assert obj in str(report)
        assert "FAILED" in str(report)
        # a sample that leaves the damaged object out still checks its presence and size
        assert verify_backup(run.svc, manifest.location, sample=0).ok

        # An edited record (same length: only the checksum can tell) is named too.
        export = backup / "mongo" / "users.jsonl"
        export.write_bytes(export.read_bytes().replace(b"driver-1", b"driver-X"))
        names = {p.path for p in verify_backup(run.svc, manifest.location).problems}
        assert names == {obj, "mongo/users.jsonl"}
        export.write_bytes(export.read_bytes().replace(b"driver-X", b"driver-1"))

    # Restoring it stops at the damaged object and removes everything it had written.
    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh:
        with pytest.raises(BackupError, match=obj):
            restore_backup(fresh.svc, manifest.location)
        assert all(rows == [] for rows in records(fresh.svc).values())
        assert not [p for p in Path(fresh.svc.blobs.root, "objects").rglob("*") if p.is_file()]


def rewrite_manifest(backup: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = backup / "manifest.json"
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body, indent=1))


def test_the_manifest_seal_catches_a_forged_checksum_a_swapped_or_an_unsealed_manifest(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
) -> None:
    """Whoever can write to the backup location can edit an export and its checksum alike;
    only the seal, made with the installation's KEK, tells. Each forgery fails verify and
    is refused by restore before anything is written."""
    dest = tmp_path / "backups"
    with serving(service_settings) as run, requests.Session() as http:
        populate(run, http)
        manifest = create_backup(run.svc, str(dest))
        older = create_backup(run.svc, str(dest))
        keys_dir = run.svc.settings.keys_dir
        backup = Path(manifest.location)
        pristine = (backup / "manifest.json").read_bytes()

        # An edited export whose checksum in the manifest was edited to match.
        export = backup / "mongo" / "users.jsonl"
        export.write_bytes(export.read_bytes().replace(b"driver-1", b"driver-X"))
        forged = hashlib.sha256(export.read_bytes()).hexdigest()

        def forge(body: dict[str, Any]) -> None:
            for entry in body["files"]:
                if entry["path"] == "mongo/users.jsonl":
                    entry["sha256"] = forged

        rewrite_manifest(backup, forge)
        report = verify_backup(run.svc, manifest.location)
        assert not report.sealed
        assert [(p.path, p.message) for p in report.problems] == [
            ("manifest.json", "the manifest does not match its seal: it was changed after "
                              "the backup was made")]
        assert "FAILED" in str(report)
        forged_manifest = (backup / "manifest.json").read_bytes()

        # The seal kept, the rest of the manifest re-indented: still whole.
        (backup / "manifest.json").write_text(json.dumps(json.loads(pristine)))
        export.write_bytes(export.read_bytes().replace(b"driver-X", b"driver-1"))
        assert verify_backup(run.svc, manifest.location).ok

        # Another backup's manifest and files, copied in whole: authentic, but not this one.
        swapped = tmp_path / "swapped" / manifest.backup_id
        shutil.copytree(older.location, swapped)
        problems = verify_backup(run.svc, str(swapped)).problems
        assert [p.path for p in problems] == ["manifest.json"]
        assert "a manifest copied over another backup's" in problems[0].message

        # Moved to another backup's name, its id edited to match: the seal was made for the
        # original id, which its key's wrapping context names.
        renamed = tmp_path / "renamed" / older.backup_id
        shutil.copytree(backup, renamed)
        rewrite_manifest(renamed, lambda body: body.update(backup_id=older.backup_id))
        problems = verify_backup(run.svc, str(renamed)).problems
        assert [p.path for p in problems] == ["manifest.json"]
        assert "or the manifest's backup id was changed" in problems[0].message

        # An unsealed manifest, as format 1 wrote them (or with its seal cut off).
        unsealed = tmp_path / "unsealed" / manifest.backup_id
        shutil.copytree(backup, unsealed)

        def unseal(body: dict[str, Any]) -> None:
            body["format_version"] = 1
            del body["seal"]

        rewrite_manifest(unsealed, unseal)
        problems = verify_backup(run.svc, str(unsealed)).problems
        assert [p.path for p in problems] == ["manifest.json"]
        assert "the manifest is not sealed" in problems[0].message

        # A format-2 manifest with its seal cut off is no older backup: never let through.
        cut = tmp_path / "cut" / manifest.backup_id
        shutil.copytree(backup, cut)
        rewrite_manifest(cut, lambda body: body.pop("seal"))
        # A seal that is not hexadecimal is malformed, not a crash of the comparison.
        odd = tmp_path / "odd" / manifest.backup_id
        shutil.copytree(backup, odd)
        rewrite_manifest(odd, lambda body: body["seal"].update(hmac_sha256="é" * 64))
        for damaged, message in [(cut, "always has one: it was removed"),
                                 (odd, "seal is malformed")]:
            problems = verify_backup(run.svc, str(damaged)).problems
            assert [p.path for p in problems] == ["manifest.json"]
            assert message in problems[0].message

    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh:
        (backup / "manifest.json").write_bytes(forged_manifest)
        for location, refusal in [(manifest.location, "does not match its seal"),
                                  (str(swapped), "copied over another backup's"),
                                  (str(unsealed), "--allow-unsealed")]:
            with pytest.raises(RestoreRefused, match=refusal):
                restore_backup(fresh.svc, location)
            assert all(rows == [] for rows in records(fresh.svc).values())
            assert not any(Path(fresh.svc.blobs.root, "objects").rglob("*"))
        with pytest.raises(RestoreRefused, match="it was removed"):
            restore_backup(fresh.svc, str(cut), allow_unsealed=True)
        # An operator who trusts the copy may still restore a backup from before the seal.
        restored = restore_backup(fresh.svc, str(unsealed), allow_unsealed=True)
        assert restored.unsealed
        assert "had no seal" in str(restored)
        assert restored.collections == manifest.collections


def test_an_interrupted_backup_is_listed_as_incomplete(
    service_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    dest = tmp_path / "backups"
    (dest / "notes").mkdir(parents=True)  # not a backup: ignored

    class Interrupted(Exception):
        pass

    def crash(message: str) -> None:
        if message.startswith("exported the database"):
            raise Interrupted  # as a full disk or a lost connection mid-backup

    with serving(service_settings) as run, requests.Session() as http:
        populate(run, http)
        done = create_backup(run.svc, str(dest))
        with pytest.raises(Interrupted):
            create_backup(run.svc, str(dest), progress=crash)
        listed = list_backups(str(dest))
        assert [s.complete for s in listed] == [False, True]  # newest first
        broken = listed[0]
        assert broken.backup_id > done.backup_id
        assert (Path(broken.location) / "mongo" / "documents.jsonl").is_file()
        assert broken.note == "no manifest"
        assert "INCOMPLETE" in str(broken)
        with pytest.raises(BackupError, match="no manifest"):
            verify_backup(run.svc, broken.location)
        with pytest.raises(BackupError, match="no manifest"):
            restore_backup(run.svc, broken.location)


def test_a_stored_document_whose_object_is_lost_fails_the_backup(
    service_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    """Only a document deleted after the export may be missing its object: one still
    stored whose file is gone (a file system fault, a wrong mount) fails the backup, which
    is then listed as incomplete, instead of being called complete and verified OK."""
    dest = tmp_path / "backups"
    with serving(service_settings) as run, requests.Session() as http:
        contents = populate(run, http)
        lost = next(iter(contents.stored))

        def lose(message: str) -> None:
            if message.startswith("exported the database"):
                run.svc.blobs.path(Area.OBJECTS, lost).unlink()

        with pytest.raises(BackupError, match=f"{lost} is stored but its object is missing"):
            create_backup(run.svc, str(dest), progress=lose)
        [broken] = list_backups(str(dest))
        assert not broken.complete


def test_backup_is_consistent_with_its_database_export(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, tmp_path: Path,
) -> None:
    """Changes after the export are not in the backup; an object deleted before it could be
    copied is reported, and verify and restore account for it."""
    dest = tmp_path / "backups"
    with serving(service_settings) as run, requests.Session() as http:
        contents = populate(run, http)
        doomed, kept = list(contents.stored)
        late: list[str] = []

        def meanwhile(message: str) -> None:
            if message.startswith("exported the database"):
                resp = http.delete(run.url(f"/v1/documents/{doomed}"), headers=AGENT,
                                   timeout=10)
                assert resp.status_code == 200
                late.append(upload(http, run.base_url, samples.pdf(), "application/pdf")
                            .json()["id"])

        manifest = create_backup(run.svc, str(dest), progress=meanwhile)
        assert manifest.missing_objects == [doomed]
        assert [f.path.rsplit("/", 1)[-1] for f in manifest.objects] == [kept]
        assert manifest.collections["documents"] == 4
        exported = (Path(manifest.location) / "mongo" / "documents.jsonl").read_text()
        assert late[0] not in exported
        assert "missing" in str(manifest)
        report = verify_backup(run.svc, manifest.location)
        assert report.ok, str(report)
        assert report.missing_objects == [doomed]
        keys_dir = run.svc.settings.keys_dir

    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh, \
            requests.Session() as http:
        restored = restore_backup(fresh.svc, manifest.location)
        assert restored.missing_objects == [doomed]
        assert "WARNING" in str(restored)
        assert_downloads(fresh, http, Contents(stored={kept: contents.stored[kept]},
                                               rejected=contents.rejected,
                                               deleted=contents.deleted))


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # moto intercepts AWS's own endpoints; a custom endpoint would bypass it.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="docproc-backups",
                         CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        yield "docproc-backups"


def test_backup_to_s3_and_restore_from_it(
    service_settings: Callable[..., Settings], other_installation: MakeInstall, s3_bucket: str,
) -> None:
    s3 = boto3.client("s3")
    root = f"s3://{s3_bucket}/nightly"
    with serving(service_settings) as run, requests.Session() as http:
        contents = populate(run, http)
        # Over the 8 MiB multipart threshold: the streamed, multipart upload path.
        big = samples.pdf(contents.mark, padding=9 * 1024 * 1024)
        big_id = upload(http, run.base_url, big, "application/pdf").json()["id"]
        assert settled(http, run.base_url, big_id, timeout=60)["status"] == "stored"
        outboxes_emptied(run)
        contents.stored[big_id] = big
        wait_for(lambda: run.svc.deliveries.col.count_documents({"state": "completed"}) == 5,
                 what="the notifications")

        manifest = create_backup(run.svc, root)
        original = records(run.svc)
        keys_dir = run.svc.settings.keys_dir
        assert manifest.location == f"{root}/{manifest.backup_id}"
        keys = {o["Key"]: o["Size"] for o in
                s3.list_objects_v2(Bucket=s3_bucket, Prefix="nightly/")["Contents"]}
        prefix = f"nightly/{manifest.backup_id}/"
        assert set(keys) == {prefix + "manifest.json"} | {prefix + f.path for f in manifest.files}
        assert {prefix + f.path: f.size for f in manifest.files}.items() <= keys.items()
        big_entry = next(f for f in manifest.objects if f.path.endswith(big_id))
        stored = s3.get_object(Bucket=s3_bucket, Key=prefix + big_entry.path)["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == big_entry.sha256
        assert stored == run.svc.blobs.path(Area.OBJECTS, big_id).read_bytes()

        sampled = verify_backup(run.svc, manifest.location, sample=1)
        assert sampled.ok, str(sampled)
        assert (sampled.objects_decrypted, sampled.objects_sampled_out) == (1, 2)
        full = verify_backup(run.svc, manifest.location)
        assert full.ok, str(full)
        assert full.objects_decrypted == 3

        # An unfinished backup (no manifest) next to it is not taken for a complete one.
        s3.put_object(Bucket=s3_bucket, Body=b"{}\n",
                      Key="nightly/20000101T000000.000Z-00000000/mongo/documents.jsonl")
        listed = list_backups(root)
        assert [(s.backup_id, s.complete) for s in listed] == [
            (manifest.backup_id, True), ("20000101T000000.000Z-00000000", False)]

    with serving(service_settings, **other_installation(keys_from=keys_dir)) as fresh, \
            requests.Session() as http:
        restored = restore_backup(fresh.svc, manifest.location)
        assert restored.objects == 3
        again = records(fresh.svc)
        for name in COLLECTIONS:
            assert without_links(again[name]) == without_links(original[name]), name
        assert_downloads(fresh, http, contents)

        # Tampering in the bucket is caught and named as on disk (the restored installation
        # has the same keys, so it can verify too).
        s3.put_object(Bucket=s3_bucket, Key=prefix + big_entry.path,
                      Body=stored[:-1] + bytes([stored[-1] ^ 1]))
        report = verify_backup(fresh.svc, manifest.location)
        assert {p.path for p in report.problems} == {big_entry.path}
