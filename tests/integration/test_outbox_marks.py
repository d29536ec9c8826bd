"""Confirmed events leave their outboxes in batches, and a mark that never gets written
leaves the event to the relay, on the MongoDB wire server."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pymongo
import pytest
import requests

from shared.config import Settings
from shared.documents import Document, DocumentRepository, OutboxEvent, Status, utcnow
from shared.outbox_marks import PublishedMarks
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


def test_marks_of_many_documents_are_one_write(repo: DocumentRepository,
                                               updates: Commands) -> None:
    recorded = [_recorded(repo) for _ in range(20)]
    marks = PublishedMarks(repo, linger=30.0)
    try:
        for doc, event in recorded:
            marks.add(doc.id, event.id)
        assert not any(_cleared(repo, doc.id) for doc, _ in recorded)  # still lingering
        before = updates.count
        marks.flush()
        assert updates.count - before == 1
        assert all(_cleared(repo, doc.id) for doc, _ in recorded)
        assert repo.claim_outbox(timedelta(seconds=30)) is None
    finally:
        marks.close()


def test_a_mark_is_written_within_the_linger(repo: DocumentRepository) -> None:
    doc, event = _recorded(repo)
    marks = PublishedMarks(repo, linger=0.05)
    try:
        marks.add(doc.id, event.id)
        wait_for(lambda: _cleared(repo, doc.id), timeout=5, what="the mark written")
    finally:
        marks.close()


def test_a_full_batch_does_not_wait_for_the_linger(repo: DocumentRepository) -> None:
    recorded = [_recorded(repo) for _ in range(4)]
    marks = PublishedMarks(repo, linger=60.0, batch=4)
    try:
        for doc, event in recorded:
            marks.add(doc.id, event.id)
        wait_for(lambda: all(_cleared(repo, doc.id) for doc, _ in recorded), timeout=5,
                 what="the full batch written")
    finally:
        marks.close()


def test_a_late_mark_leaves_a_newer_outcome_in_the_outbox(repo: DocumentRepository) -> None:
    doc, uploaded = _recorded(repo)
    stored = OutboxEvent(id=unique("evt-"), payload='{"type": "stored"}')
    finished = repo.finish(doc, Status.STORED, stored)
    assert finished is not None
    due = _raw(repo, doc.id)["outbox_due"]
    marks = PublishedMarks(repo, linger=30.0)
    marks.add(doc.id, uploaded.id)  # the upload's confirm, written after storage finished
    marks.close()
    raw = _raw(repo, doc.id)
    assert raw["outbox"] == [stored.entry()]
    assert raw["outbox_due"] == due  # the relay still publishes the outcome if need be


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
