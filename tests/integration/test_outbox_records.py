"""The documents' transactional outbox, record by record, on the MongoDB wire server."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from shared.documents import (
    Document,
    DocumentRepository,
    OutboxEvent,
    Outcome,
    Status,
    utcnow,
)
from tests.services import MongoServer, documents_repository, unique

pytestmark = pytest.mark.services

UPLOADED = OutboxEvent(id="evt-uploaded", payload='{"type": "uploaded"}')
STORED = OutboxEvent(id="evt-stored", payload='{"type": "stored"}')


@pytest.fixture
def repo(mongo: MongoServer) -> Iterator[DocumentRepository]:
    with documents_repository(mongo, "docproc_outbox_") as repository:
        yield repository


def _recorded(repo: DocumentRepository, event: OutboxEvent | None = UPLOADED) -> Document:
    now = utcnow()
    doc = Document(_id=unique("doc-"), owner="driver-1", filename="note.pdf",
                   declared_type="application/pdf", size=3, sha256=secrets.token_hex(32),
                   created_at=now, updated_at=now, wrapped_key={"provider": "local"},
                   upload_event_id=UPLOADED.id)
    repo.insert(doc, event)
    stored = repo.get(doc.id)
    assert stored is not None
    return stored


def _raw(repo: DocumentRepository, doc_id: str) -> dict[str, Any]:
    raw = repo.col.find_one({"_id": doc_id})
    assert raw is not None
    return raw


def test_the_last_confirmed_event_leaves_the_relay_nothing_to_look_at(
    repo: DocumentRepository,
) -> None:
    doc = _recorded(repo)
    assert _raw(repo, doc.id)["outbox_due"] is not None
    repo.published(doc.id, UPLOADED.id)
    raw = _raw(repo, doc.id)
    assert raw["outbox"] == []
    # Without this the relay had to claim, read and rewrite every record once more.
    assert "outbox_due" not in raw
    assert repo.claim_outbox(timedelta(seconds=30)) is None


def test_an_event_still_unconfirmed_keeps_the_record_due(repo: DocumentRepository) -> None:
    doc = _recorded(repo)
    repo.col.update_one({"_id": doc.id}, {"$push": {"outbox": STORED.entry()}})
    repo.published(doc.id, UPLOADED.id)
    raw = _raw(repo, doc.id)
    assert raw["outbox"] == [STORED.entry()]
    assert raw["outbox_due"] == doc.outbox_due
    repo.published(doc.id, "evt-never-recorded")  # a duplicate confirm changes nothing
    assert _raw(repo, doc.id)["outbox"] == [STORED.entry()]


def test_finishing_empties_the_outbox_its_consumer_proves_delivered(
    repo: DocumentRepository,
) -> None:
    doc = _recorded(repo)  # the upload's publish was never confirmed
    finished = repo.finish(doc, Status.STORED, media_type="application/pdf",
                           metadata={"pages": 1})
    assert finished is not None
    # The outcome's own event is not recorded: the event being handled is acknowledged
    # only once the outcome's is published, so a crash in between announces it again.
    assert (finished.outbox, finished.outbox_due) == ([], None)
    assert "outbox_due" not in _raw(repo, doc.id)
    assert repo.claim_outbox(timedelta(seconds=30)) is None  # nothing for the relay
    # What finish returns is what the database holds, without a read to learn it.
    assert finished == repo.get(doc.id)
    assert finished.status is Status.STORED
    assert finished.metadata == {"pages": 1}
    # A second outcome for the same upload (a redelivery racing the first) is refused.
    assert repo.finish(doc, Status.REJECTED, reason="late") is None
    assert _raw(repo, doc.id)["status"] == "stored"


def test_finish_leaves_a_document_deleted_while_it_was_processed(
    repo: DocumentRepository,
) -> None:
    doc = _recorded(repo)
    assert repo.tombstone(doc.id, by="agent-1") is not None
    for status in (Status.STORED, Status.REJECTED, Status.FAILED):
        assert repo.finish(doc, status, reason="late") is None
    raw = _raw(repo, doc.id)
    assert (raw["status"], raw["deleted_by"]) == ("deleted", "agent-1")
    assert "reason" not in raw


def test_finish_many_says_which_documents_it_finished(repo: DocumentRepository) -> None:
    """One write for a batch's outcomes; a document that left `processing` meanwhile (here
    deleted, or finished by a duplicate) is reported as not finished, the others as done."""
    docs = [_recorded(repo) for _ in range(4)]
    assert repo.tombstone(docs[1].id, by="agent-1") is not None
    assert repo.finish(docs[3], Status.REJECTED, reason="first") is not None
    finished = repo.finish_many([(docs[0], Status.STORED, {"media_type": "application/pdf"}),
                                 (docs[1], Status.STORED, {}),
                                 (docs[2], Status.FAILED, {"reason": "broken"}),
                                 (docs[3], Status.STORED, {})])
    assert [d.status if d else None for d in finished] == [Status.STORED, None, Status.FAILED,
                                                           None]
    assert [_raw(repo, d.id)["status"] for d in docs] == ["stored", "deleted", "failed",
                                                          "rejected"]
    assert finished[0] is not None
    assert finished[0].media_type == "application/pdf"
    assert finished[0].updated_at == _raw(repo, docs[0].id)["updated_at"]
    assert "content_slot" not in _raw(repo, docs[2].id)  # failed: its bytes may come again
    everything: list[Outcome] = [(d, Status.STORED, {})
                                 for d in (_recorded(repo), _recorded(repo))]
    assert all(repo.finish_many(everything))
    assert repo.finish_many(everything) == [None, None]


def test_an_outcome_the_broker_refused_is_due_for_the_relay_at_once(
    repo: DocumentRepository,
) -> None:
    doc = _recorded(repo)
    assert repo.finish(doc, Status.STORED) is not None
    repo.record_unpublished(doc.id, STORED)
    claimed = repo.claim_outbox(timedelta(seconds=30))
    assert claimed is not None
    assert claimed.id == doc.id
    assert claimed.outbox == [STORED.entry()]
    repo.published(doc.id, STORED.id)
    raw = _raw(repo, doc.id)
    assert raw["outbox"] == []
    assert "outbox_due" not in raw
