"""Confirmed events leave their outboxes in batches, and a mark that never gets written
leaves the event to the relay, on the MongoDB wire server."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pymongo
import pytest
import requests
from prometheus_client import REGISTRY

from shared.config import Settings
from shared.documents import Document, DocumentRepository, OutboxEvent, Status, utcnow
from shared.outbox_marks import BATCH, MAX_PENDING_BATCHES, PublishedMarks
from tests import samples
from tests.conftest import serving
from tests.helpers import Commands, upload, wait_for
from tests.services import MongoServer, documents_repository, unique

pytestmark = pytest.mark.services


@pytest.fixture
def updates() -> Commands:
    return Commands("update")


@pytest.fixture
def repo(mongo: MongoServer, updates: Commands) -> Iterator[DocumentRepository]:
    with documents_repository(mongo, "docproc_marks_", (updates,)) as repository:
        yield repository


def _recorded(repo: DocumentRepository) -> tuple[Document, OutboxEvent]:
    now = utcnow()
    event = OutboxEvent(id=unique("evt-"), payload='{"type": "uploaded"}')
    doc = Document(_id=unique("doc-"), owner="driver-1", filename="note.pdf",
                   declared_type="application/pdf", size=3, sha256=secrets.token_hex(32),
                   created_at=now, updated_at=now, wrapped_key={"provider": "local"},
                   upload_event_id=event.id)
    repo.insert(doc, event)
    return doc, event


def _raw(repo: DocumentRepository, doc_id: str) -> dict[str, Any]:
    raw = repo.col.find_one({"_id": doc_id})
    assert raw is not None
    return raw


def _cleared(repo: DocumentRepository, doc_id: str) -> bool:
    raw = _raw(repo, doc_id)
    return raw["outbox"] == [] and "outbox_due" not in raw


def _marked(result: str) -> float:
    return REGISTRY.get_sample_value("docproc_outbox_marks_total", {"result": result}) or 0.0


def test_marks_of_many_documents_are_one_write_a_batch(repo: DocumentRepository,
                                                       updates: Commands) -> None:
    recorded = [_recorded(repo) for _ in range(2 * BATCH)]
    marks = PublishedMarks(repo, linger=30.0)
    try:
        for doc, event in recorded:
            marks.add(doc.id, event.id)
        assert not any(_cleared(repo, doc.id) for doc, _ in recorded)  # still lingering
        before = updates.count
        marks.flush()
        assert updates.count - before == 2
        assert all(_cleared(repo, doc.id) for doc, _ in recorded)
        assert repo.claim_outbox(timedelta(seconds=30)) is None
    finally:
        marks.close()


def test_marks_of_finished_documents_write_nothing(repo: DocumentRepository) -> None:
    """Storage's outcome empties the outbox, so a mark that waited for it has nothing to
    write: the server only looks the record up."""
    recorded = [_recorded(repo) for _ in range(6)]
    for doc, _ in recorded[:4]:
        assert repo.finish(doc, Status.STORED) is not None
    finished = {doc.id: _raw(repo, doc.id) for doc, _ in recorded[:4]}
    written, moot = _marked("written"), _marked("moot")
    marks = PublishedMarks(repo, linger=30.0)
    for doc, event in recorded:
        marks.add(doc.id, event.id)
    marks.close()
    assert (_marked("written") - written, _marked("moot") - moot) == (2, 4)
    assert {doc_id: _raw(repo, doc_id) for doc_id in finished} == finished  # untouched
    assert all(_cleared(repo, doc.id) for doc, _ in recorded[4:])


def test_a_mark_is_written_within_the_linger(repo: DocumentRepository) -> None:
    doc, event = _recorded(repo)
    marks = PublishedMarks(repo, linger=0.05)
    try:
        marks.add(doc.id, event.id)
        wait_for(lambda: _cleared(repo, doc.id), timeout=5, what="the mark written")
    finally:
        marks.close()


def test_marks_wait_their_linger_then_go_in_bounded_batches(
    repo: DocumentRepository, updates: Commands,
) -> None:
    recorded = [_recorded(repo) for _ in range(10)]
    marks = PublishedMarks(repo, linger=1.0, batch=4)
    try:
        before = updates.count
        for doc, event in recorded:
            marks.add(doc.id, event.id)
        assert not any(_cleared(repo, doc.id) for doc, _ in recorded)  # a full batch waits
        wait_for(lambda: all(_cleared(repo, doc.id) for doc, _ in recorded), timeout=10,
                 what="the marks written")
        assert updates.count - before == 3  # 4 + 4 + 2
    finally:
        marks.close()


def test_a_backlog_of_marks_goes_out_without_waiting(repo: DocumentRepository) -> None:
    batch = 2
    recorded = [_recorded(repo) for _ in range(batch * MAX_PENDING_BATCHES)]
    marks = PublishedMarks(repo, linger=60.0, batch=batch)
    try:
        for doc, event in recorded:
            marks.add(doc.id, event.id)
        wait_for(lambda: all(_cleared(repo, doc.id) for doc, _ in recorded[:batch]),
                 timeout=10, what="the oldest batch written")
    finally:
        marks.close()


def test_a_late_mark_leaves_a_refused_outcome_in_the_outbox(repo: DocumentRepository) -> None:
    doc, uploaded = _recorded(repo)
    assert repo.finish(doc, Status.STORED) is not None
    stored = OutboxEvent(id=unique("evt-"), payload='{"type": "stored"}')
    repo.record_unpublished(doc.id, stored)  # the broker refused the outcome's event
    due = _raw(repo, doc.id)["outbox_due"]
    marks = PublishedMarks(repo, linger=30.0)
    marks.add(doc.id, uploaded.id)  # the upload's confirm, written after storage finished
    marks.close()
    raw = _raw(repo, doc.id)
    assert raw["outbox"] == [stored.entry()]
    assert raw["outbox_due"] == due  # the relay still publishes the outcome


def test_closing_writes_what_is_pending_and_later_marks_at_once(
    repo: DocumentRepository,
) -> None:
    first, first_event = _recorded(repo)
    second, second_event = _recorded(repo)
    marks = PublishedMarks(repo, linger=60.0)
    marks.add(first.id, first_event.id)
    marks.close()
    assert _cleared(repo, first.id)
    marks.add(second.id, second_event.id)
    assert _cleared(repo, second.id)


def test_a_mark_that_cannot_be_written_leaves_the_event_to_the_relay(
    repo: DocumentRepository, caplog: pytest.LogCaptureFixture,
) -> None:
    doc, event = _recorded(repo)
    away: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        "mongodb://127.0.0.1:9/?retryWrites=false", serverSelectionTimeoutMS=200)
    try:
        marks = PublishedMarks(DocumentRepository(away[repo.col.database.name]), linger=0)
        with caplog.at_level(logging.WARNING, logger="shared.outbox_marks"):
            marks.add(doc.id, event.id)  # does not raise: the event is already published
        assert "could not record 1 confirmed event" in caplog.text
    finally:
        away.close()
    raw = _raw(repo, doc.id)
    assert raw["outbox"] == [event.entry()]
    repo.col.update_one({"_id": doc.id}, {"$set": {"outbox_due": utcnow()}})
    claimed = repo.claim_outbox(timedelta(seconds=30))
    assert claimed is not None
    assert claimed.id == doc.id


def test_stopping_the_pipeline_writes_its_pending_marks(
    service_settings: Callable[..., Settings], http: requests.Session,
) -> None:
    with serving(service_settings, consumers=False, outbox_mark_linger_seconds=1.0,
                 outbox_grace_seconds=60) as run:
        resp = upload(http, run.base_url, samples.pdf(samples.marker()), "application/pdf")
        assert resp.status_code == 202, resp.text
        doc_id = resp.json()["id"]
        record = run.svc.documents.get(doc_id)
        assert [e["id"] for e in record.outbox] == [record.upload_event_id]  # still lingering
        settings = run.svc.settings
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(settings.mongodb_uri)
    try:
        raw = client[settings.mongodb_database]["documents"].find_one({"_id": doc_id})
    finally:
        client.close()
    assert raw is not None
    assert raw["outbox"] == []
    assert "outbox_due" not in raw


def test_marks_waiting_on_a_stuck_writer_are_bounded(
    repo: DocumentRepository, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's database call hangs while uploads keep being confirmed: past twice the
    backlog that makes it hurry, each new mark is written by the thread that adds it, so a
    process's memory does not grow with every confirmed upload."""
    batch = 2
    limit = 2 * batch * MAX_PENDING_BATCHES
    stuck = threading.Event()
    release = threading.Event()
    real = repo.published_many

    def hangs_in_the_writer(marks: list[tuple[str, str]]) -> int:
        if threading.current_thread().name == "outbox-marks":
            stuck.set()
            release.wait(30)
        return real(marks)

    monkeypatch.setattr(repo, "published_many", hangs_in_the_writer)
    marks = PublishedMarks(repo, linger=60.0, batch=batch)
    extra = [_recorded(repo) for _ in range(3)]
    try:
        for _ in range(limit):
            marks.add(unique("doc-"), unique("evt-"))
            assert len(marks._pending) <= limit
        assert stuck.wait(10)  # the writer holds its batch, hanging
        while len(marks._pending) < limit:
            marks.add(unique("doc-"), unique("evt-"))
        for doc, event in extra:
            marks.add(doc.id, event.id)
            assert len(marks._pending) == limit
        # written at once, by the adding thread, while the writer still hangs
        assert all(_cleared(repo, doc.id) for doc, _ in extra)
    finally:
        release.set()
        marks.close()
