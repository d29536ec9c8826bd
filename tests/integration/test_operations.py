"""Operations on the real services and on the embedded bus: dead letters listed with their
reason and replayed after a fix, stuck documents reprocessed, keys rotated in place."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
import requests
from moto import mock_aws

from docproc.cli import main
from docproc.operations import dead_letters, reprocess, rewrap_all
from shared.blobstore import Area
from shared.config import Settings
from shared.keys import KmsKeyProvider, LocalKeyring
from tests import samples
from tests.conftest import Running, serving
from tests.helpers import DRIVER, settled, upload, wait_for

pytestmark = pytest.mark.services


@pytest.fixture(params=["rabbitmq", "embedded-bus"])
def run(request: pytest.FixtureRequest,
        service_settings: Callable[..., Settings]) -> Iterator[Running]:
    overrides: dict[str, Any] = {} if request.param == "rabbitmq" else {"amqp_url": None}
    with serving(service_settings, **overrides) as running:
        yield running


def _env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    from tests.processes import settings_env

    for key, value in settings_env(settings).items():
        if key.startswith(("DOCPROC_", "AMQP_", "MONGODB_", "REDIS_", "FIREBASE_", "FCM_")):
            monkeypatch.setenv(key, value)
    if not settings.amqp_url:
        monkeypatch.delenv("AMQP_URL", raising=False)


def test_dead_letters_are_listed_with_reason_and_replayed_after_a_fix(
    run: Running, http: requests.Session, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    svc = run.svc
    # Hide the staged object before storage sees it: the event can only fail.
    blobs = svc.blobs
    original_exists, original_open = blobs.exists, blobs.open
    hidden: set[str] = set()
    monkeypatch.setattr(blobs, "exists", lambda area, i: i not in hidden and
                        original_exists(area, i))

    def failing_open(area: Area, doc_id: str) -> Any:
        if doc_id in hidden:
            raise FileNotFoundError(f"staged object of {doc_id} is missing")
        return original_open(area, doc_id)

    monkeypatch.setattr(blobs, "open", failing_open)
    body = samples.pdf(samples.marker())
    # Uploads go through once the id is known; hide every new document for now.
    original_writer = blobs.writer

    def hiding_writer(area: Area, doc_id: str) -> Any:
        hidden.add(doc_id)
        return original_writer(area, doc_id)

    monkeypatch.setattr(blobs, "writer", hiding_writer)
    doc_id = upload(http, run.base_url, body, "application/pdf").json()["id"]
    store = dead_letters(svc)
    [letter] = wait_for(lambda: store.list("storage"), what="the dead letter")
    assert letter.id == svc.documents.get(doc_id).upload_event_id
    assert letter.attempts == len(svc.settings.retry_delays) + 1
    assert "staged object of" in letter.reason
    assert letter.event["subject"] == doc_id

    _env(monkeypatch, svc.settings)
    assert main(["dlq", "list", "storage"]) == 0
    out = capsys.readouterr().out
    assert letter.id in out
    assert "1 dead letter(s) for storage" in out
    assert main(["dlq", "replay", "storage"]) == 2  # refuses without ids or --all

    hidden.clear()  # the fix
    assert main(["dlq", "replay", "storage", letter.id]) == 0
    assert settled(http, run.base_url, doc_id)["status"] == "stored"
    assert store.list("storage") == []


def test_replaying_letters_that_fail_again_replays_each_once_and_loses_none(
    run: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replayed letter that fails at once comes back as a letter while the replay is
    still going: it is not replayed again within that replay, and its new letter is not
    taken for its old one (and removed with it)."""
    from cloudevents.http import CloudEvent

    from events.catalog import DOCUMENT_UPLOADED

    svc = run.svc
    store = dead_letters(svc)
    ids = []
    for n in range(20):  # data that can never validate: dead-lettered at once, every time
        event = CloudEvent({"id": f"again-{n}-{svc.settings.amqp_prefix}", "source": "/t",
                            "type": DOCUMENT_UPLOADED}, {"document_id": n})
        svc.publish(event)
        ids.append(str(event["id"]))
    wait_for(lambda: len(store.list("storage")) == 20 or None, what="twenty dead letters")
    if not svc.settings.amqp_url:
        # The embedded bus: let each replayed event fail again before its old letter goes.
        real_delete = store.dead.delete_one  # type: ignore[attr-defined]
        queue = store.queue  # type: ignore[attr-defined]

        def after_the_next_failure(flt: Any) -> Any:
            wait_for(lambda: queue.count_documents({}) == 0 or None, what="the failure")
            return real_delete(flt)

        monkeypatch.setattr(store.dead, "delete_one", after_the_next_failure)  # type: ignore[attr-defined]
    assert store.replay("storage", None) == 20
    wait_for(lambda: sorted(d.id for d in store.list("storage")) == sorted(ids) or None,
             timeout=20, what="each letter back once")


def test_dead_letters_can_be_purged(run: Running) -> None:
    from cloudevents.http import CloudEvent

    from events.catalog import DOCUMENT_UPLOADED

    svc = run.svc
    ids = []
    for n in range(2):  # data that can never validate: dead-lettered at once
        event = CloudEvent({"id": f"bad-{n}-{svc.settings.amqp_prefix}", "source": "/t",
                            "type": DOCUMENT_UPLOADED}, {"document_id": n})
        svc.publish(event)
        ids.append(str(event["id"]))
    store = dead_letters(svc)
    wait_for(lambda: len(store.list("storage")) == 2, what="two dead letters")
    assert all("MalformedEvent" in d.reason and d.attempts == 1 for d in store.list("storage"))
    assert store.purge("storage", {ids[0]}) == 1
    assert [d.id for d in store.list("storage")] == [ids[1]]
    assert store.purge("storage", None) == 1
    assert store.list("storage") == []


def test_stuck_documents_are_visible_and_reprocessed(
    run: Running, http: requests.Session, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    svc = run.svc
    working = svc.publisher
    from events.publisher import PublishError

    class Lost:
        def publish(self, event: Any) -> None:
            raise PublishError("broker gone")

        def close(self) -> None:
            pass

    svc.publisher = Lost()
    try:
        doc_id = upload(http, run.base_url, samples.pdf(samples.marker()),
                        "application/pdf").json()["id"]
        # The event is lost for good (say a broker lost its disk): only the record remains.
        svc.documents.col.update_one({"_id": doc_id},
                                     {"$set": {"outbox": []}, "$unset": {"outbox_due": ""}})
    finally:
        svc.publisher = working
    stuck = http.get(run.url("/v1/documents"), params={"status": "processing"},
                     headers={"X-Consumer-Username": "agent-1", "X-Consumer-Groups": "agents"})
    assert [d["id"] for d in stuck.json()["items"]] == [doc_id]
    from datetime import timedelta

    # One run sends at most a batch, and says when there may be more.
    monkeypatch.setattr("docproc.operations.REPROCESS_BATCH", 1)
    _env(monkeypatch, svc.settings)
    assert main(["reprocess", "--status", "processing", "--older-than", "0s"]) == 0
    out = capsys.readouterr().out
    assert f"requeued {doc_id}" in out
    assert "more may be stuck" in out
    assert settled(http, run.base_url, doc_id)["status"] == "stored"
    assert reprocess(svc, older_than=timedelta(seconds=0)) == []
    # reprocessing a finished document only announces it again
    assert reprocess(svc, [doc_id]) == [doc_id]
    with pytest.raises(LookupError):
        reprocess(svc, ["0" * 32])


def test_a_reprocess_cut_short_by_the_broker_says_what_it_sent(
    run: Running, http: requests.Session, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from docproc.runtime import Services
    from events.publisher import PublishError

    ids = [upload(http, run.base_url, samples.pdf(samples.marker()), "application/pdf")
           .json()["id"] for _ in range(3)]
    for doc_id in ids:
        assert settled(http, run.base_url, doc_id)["status"] == "stored"
    sent: list[str] = []
    real = Services.publish

    def refuses_the_second(svc: Services, event: Any) -> None:
        if len(sent) == 1:
            raise PublishError("broker did not confirm: connection reset")
        real(svc, event)
        sent.append(str(event["subject"]))

    monkeypatch.setattr(Services, "publish", refuses_the_second)
    _env(monkeypatch, run.svc.settings)
    assert main(["reprocess", *ids]) == 1
    out, err = capsys.readouterr()
    assert out == f"requeued {ids[0]}\n"
    assert "stopped after sending 1 of 3 document(s): broker did not confirm" in err
    assert f"not sent: {ids[1]}, {ids[2]}" in err
    assert "Traceback" not in err


def test_local_key_rotation_rewraps_and_documents_stay_readable(
    service_settings: Callable[..., Settings], http: requests.Session,
) -> None:
    with serving(service_settings) as run:
        bodies = [samples.pdf(samples.marker()) for _ in range(3)]
        docs = [settled(http, run.base_url,
                        upload(http, run.base_url, b, "application/pdf").json()["id"])
                for b in bodies]
        ring = LocalKeyring(run.svc.settings.keys_dir)
        old = ring.active_key_id()
        objects = {d["id"]: run.svc.blobs.path(Area.OBJECTS, d["id"]).read_bytes() for d in docs}
        new = ring.rotate()

        # An interrupted run leaves a mix of old and new; running again finishes the job.
        with pytest.raises(KeyboardInterrupt):
            _partial(run, ring)
        report = rewrap_all(run.svc, ring)
        assert report.rewrapped + report.already_current == 3
        assert report.rewrapped >= 1
        for d, body in zip(docs, bodies, strict=True):
            record = run.svc.documents.get(d["id"])
            assert record is not None
            assert record.key.key_id == new != old
            # documents untouched, still readable
            assert run.svc.blobs.path(Area.OBJECTS, d["id"]).read_bytes() == objects[d["id"]]
            assert http.get(d["download_url"], headers=DRIVER).content == body
        again = rewrap_all(run.svc, ring)
        assert (again.rewrapped, again.already_current) == (0, 3)


def test_a_data_key_that_cannot_be_rewrapped_is_reported_and_the_rest_go_on(
    service_settings: Callable[..., Settings], http: requests.Session,
) -> None:
    with serving(service_settings) as run:
        ids = [settled(http, run.base_url, upload(http, run.base_url, samples.pdf(
            samples.marker()), "application/pdf").json()["id"])["id"] for _ in range(3)]
        # One record names a KEK this keyring never had (another installation's, say).
        run.svc.documents.col.update_one({"_id": ids[1]},
                                         {"$set": {"wrapped_key.key_id": "k-elsewhere"}})
        ring = LocalKeyring(run.svc.settings.keys_dir)
        new = ring.rotate()
        report = rewrap_all(run.svc, ring)
        assert (report.rewrapped, report.already_current) == (2, 0)
        assert list(report.failed) == [ids[1]]
        assert "NOT re-wrapped: " + ids[1] in str(report)
        for doc_id in (ids[0], ids[2]):
            record = run.svc.documents.get(doc_id)
            assert record is not None
            assert record.key.key_id == new


def _partial(run: Running, ring: LocalKeyring) -> None:
    """Re-wrap the first document only, then stop as an interrupted run would."""
    from shared.keys import WrappedKey

    raw = run.svc.documents.col.find_one({}, sort=[("_id", 1)])
    assert raw is not None
    new = ring.rewrap(WrappedKey.from_doc(raw["wrapped_key"]), {"document_id": raw["_id"]})
    run.svc.documents.col.update_one({"_id": raw["_id"]}, {"$set": {"wrapped_key": new.to_doc()}})
    raise KeyboardInterrupt


def test_kms_rotation_to_a_new_key(service_settings: Callable[..., Settings],
                                   http: requests.Session,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        kms = boto3.client("kms")
        first = kms.create_key()["KeyMetadata"]["Arn"]
        second = kms.create_key()["KeyMetadata"]["Arn"]
        with serving(service_settings, kms_key_id=first) as run:
            body = samples.jpeg(samples.marker())
            doc = settled(http, run.base_url,
                          upload(http, run.base_url, body, "image/jpeg").json()["id"])
            report = rewrap_all(run.svc, KmsKeyProvider(second))
            assert report.rewrapped == 1
            record = run.svc.documents.get(doc["id"])
            assert record is not None
            assert record.key.key_id == second
            assert http.get(doc["download_url"], headers=DRIVER).content == body
    assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_backup_commands(running: Running, http: requests.Session, tmp_path: Any,
                         monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    body = samples.pdf(samples.marker())
    settled(http, running.base_url,
            upload(http, running.base_url, body, "application/pdf").json()["id"])
    _env(monkeypatch, running.svc.settings)
    dest = str(tmp_path / "backups")
    assert main(["backup", "create", dest]) == 0
    assert main(["backup", "list", dest]) == 0
    listing = capsys.readouterr().out
    assert "1 backup(s)" in listing
    [location] = [str(p) for p in (tmp_path / "backups").iterdir()]
    assert main(["backup", "verify", location]) == 0
    # restoring over the live installation is refused: it is not empty
    assert main(["backup", "restore", location]) == 1
    assert "not empty" in capsys.readouterr().err


def test_backup_commands_say_what_went_wrong_without_a_traceback(
        running: Running, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _env(monkeypatch, running.svc.settings)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    # No location: refused, rather than a backup written into the current directory.
    for action in ("create", "list", "verify", "restore"):
        assert main(["backup", action]) == 2
        assert f"backup {action} needs a location" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []

    # The file system fails under the command: one line naming the error, exit 1.
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    assert main(["backup", "create", str(blocker / "backups")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("docproc: backup create failed: ")
    assert "Traceback" not in err
    assert "not-a-directory" in err
