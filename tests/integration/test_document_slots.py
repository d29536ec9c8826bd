"""What is unique per owner: one record per Idempotency-Key, and one live document per
content, decided by the database's unique indexes even when the repeats arrive together."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.documents import (
    CONTENT_SLOT,
    IDEMPOTENCY_SLOT,
    PRE_SLOT_INDEXES,
    Document,
    DocumentRepository,
    DuplicateContent,
    DuplicateIdempotencyKey,
    Status,
    slot,
    utcnow,
)
from tests.services import MongoServer, documents_repository, unique

pytestmark = pytest.mark.services

BYTES_A = "a" * 64
BYTES_B = "b" * 64


@pytest.fixture
def repo(mongo: MongoServer) -> Iterator[DocumentRepository]:
    with documents_repository(mongo, "docproc_slots_") as repository:
        yield repository


def _doc(sha256: str, owner: str = "driver-1", *, key: str | None = None,
         age: timedelta = timedelta(0), status: Status = Status.PROCESSING) -> Document:
    when = utcnow() - age
    return Document(_id=unique("doc-"), owner=owner, filename="pod.pdf",
                    declared_type="application/pdf", size=3, sha256=sha256, status=status,
                    idempotency_key=key, created_at=when, updated_at=when,
                    wrapped_key={"provider": "local"}, upload_event_id=unique("evt-"))


def _raw(repo: DocumentRepository, doc_id: str) -> dict[str, Any]:
    raw = repo.col.find_one({"_id": doc_id})
    assert raw is not None
    return raw


def test_a_second_live_copy_is_refused_naming_the_first(repo: DocumentRepository) -> None:
    first = _doc(BYTES_A)
    repo.insert(first)
    with pytest.raises(DuplicateContent) as refused:
        repo.insert(_doc(BYTES_A))
    assert refused.value.existing.id == first.id
    repo.insert(_doc(BYTES_A, owner="driver-2"))  # another owner's copy is their own
    repo.insert(_doc(BYTES_B))
    assert repo.col.count_documents({"owner": "driver-1"}) == 2
    assert repo.live_with_content("driver-1", BYTES_A) == repo.get(first.id)


def test_no_owner_and_value_can_take_another_owners_slot(repo: DocumentRepository) -> None:
    # Joined naively, ("a:b", "k") and ("a", "b:k") would be the same string.
    assert slot("a:b", "k") != slot("a", "b:k")
    repo.insert(_doc(BYTES_A, owner="a:b", key="k"))
    mine = _doc(BYTES_B, owner="a", key="b:k")
    repo.insert(mine)
    assert repo.by_idempotency_key("a", "b:k") == repo.get(mine.id)


def test_of_concurrent_copies_exactly_one_is_recorded(repo: DocumentRepository) -> None:
    copies = [_doc(BYTES_A) for _ in range(8)]
    start = threading.Barrier(len(copies))
    recorded: list[str] = []
    refused: list[str] = []

    def record(doc: Document) -> None:
        start.wait()
        try:
            repo.insert(doc)
            recorded.append(doc.id)
        except DuplicateContent as dup:
            refused.append(dup.existing.id)

    threads = [threading.Thread(target=record, args=(doc,)) for doc in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(recorded) == 1
    assert refused == recorded * (len(copies) - 1)
    assert repo.col.count_documents({"owner": "driver-1"}) == 1


def test_an_idempotency_key_names_one_record_whatever_its_bytes(
    repo: DocumentRepository,
) -> None:
    first = _doc(BYTES_A, key="upload-7")
    repo.insert(first)
    with pytest.raises(DuplicateIdempotencyKey) as repeated:
        repo.insert(_doc(BYTES_B, key="upload-7"))
    assert repeated.value.existing.id == first.id
    assert repo.by_idempotency_key("driver-1", "upload-7") == repo.get(first.id)
    assert repo.by_idempotency_key("driver-2", "upload-7") is None


def test_rejected_stays_the_answer_failed_and_deleted_free_the_bytes(
    repo: DocumentRepository,
) -> None:
    rejected = _doc(BYTES_A)
    repo.insert(rejected)
    assert repo.finish(rejected, Status.REJECTED) is not None
    with pytest.raises(DuplicateContent):  # the same bytes would be refused the same way
        repo.insert(_doc(BYTES_A))

    failed = _doc(BYTES_B)
    repo.insert(failed)
    assert repo.finish(failed, Status.FAILED, reason="integrity check") is not None
    assert CONTENT_SLOT not in _raw(repo, failed.id)
    retried = _doc(BYTES_B)
    repo.insert(retried)  # a failed upload may be tried again

    assert repo.tombstone(retried.id, by="agent-1") is not None
    assert repo.tombstone(rejected.id, by="agent-1") is not None
    for sha256 in (BYTES_A, BYTES_B):
        assert repo.live_with_content("driver-1", sha256) is None
        repo.insert(_doc(sha256))
    assert repo.col.count_documents({CONTENT_SLOT: {"$exists": True}}) == 2


def _as_an_older_version(repo: DocumentRepository) -> DocumentRepository:
    """The indexes versions before the slots made, and a process of this version starting
    on that database."""
    repo.col.create_index([("owner", 1), ("idempotency_key", 1)], name=PRE_SLOT_INDEXES[0],
                          unique=True,
                          partialFilterExpression={"idempotency_key": {"$type": "string"}})
    repo.col.create_index([("owner", 1), ("sha256", 1), ("status", 1)],
                          name=PRE_SLOT_INDEXES[1])
    started = DocumentRepository(repo.col.database)
    started.ensure_indexes()
    return started


def _older_versions_records(repo: DocumentRepository) -> tuple[Document, ...]:
    """Records as an older version writes them: without slots, and among them two live
    copies of the same bytes (its look-before-insert let a double tap through)."""
    first = _doc(BYTES_A, age=timedelta(minutes=5), status=Status.STORED)
    second = _doc(BYTES_A, key="tap-2", age=timedelta(minutes=1), status=Status.STORED)
    other = _doc(BYTES_B, age=timedelta(minutes=3), status=Status.REJECTED)
    failed = _doc("c" * 64, key="tap-3", status=Status.FAILED)
    for doc in (second, first, other, failed):
        repo.col.insert_one(doc.to_mongo())
    return first, second, other, failed


def test_beside_an_older_version_its_records_still_count(repo: DocumentRepository) -> None:
    # A traffic split or the other blue-green cluster: an older version writes records
    # into the same database while this one runs.
    repo = _as_an_older_version(repo)
    first, second, other, failed = _older_versions_records(repo)

    assert set(PRE_SLOT_INDEXES) <= set(repo.col.index_information())  # theirs, kept
    assert repo.by_idempotency_key("driver-1", "tap-3") == repo.get(failed.id)
    assert repo.live_with_content("driver-1", BYTES_B) == repo.get(other.id)
    with pytest.raises(DuplicateIdempotencyKey) as retried:
        repo.insert(_doc("d" * 64, key="tap-2"))  # a retry of their upload, reaching us
    assert retried.value.existing.id == second.id
    with pytest.raises(DuplicateContent) as repeated:
        repo.insert(_doc(BYTES_A))
    assert repeated.value.existing.id == first.id  # the oldest copy answers repeats
    assert repo.col.count_documents({}) == 4


def test_migrate_fills_the_slots_once_no_older_version_runs(
    repo: DocumentRepository, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from docproc.cli import main

    repo = _as_an_older_version(repo)
    first, second, other, failed = _older_versions_records(repo)

    client = repo.col.database.client
    address = client.address
    assert address is not None
    monkeypatch.setenv("MONGODB_URI", f"mongodb://{address[0]}:{address[1]}/")
    monkeypatch.setenv("MONGODB_DATABASE", repo.col.database.name)
    monkeypatch.setenv("DOCPROC_DATA_DIR", str(tmp_path / "data"))
    for name in ("AMQP_URL", "REDIS_URL", "K_SINK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["migrate"]) == 0
    assert "filled 4 uniqueness slot(s)" in capsys.readouterr().out

    slots = {raw["_id"]: (raw.get(IDEMPOTENCY_SLOT), raw.get(CONTENT_SLOT))
             for raw in repo.col.find({})}
    assert slots == {
        first.id: (None, slot("driver-1", BYTES_A)),
        second.id: (slot("driver-1", "tap-2"), None),  # the older copy holds the content
        other.id: (None, slot("driver-1", BYTES_B)),
        failed.id: (slot("driver-1", "tap-3"), None),
    }
    assert not set(PRE_SLOT_INDEXES) & set(repo.col.index_information())
    assert main(["migrate"]) == 0
    assert "nothing left to migrate" in capsys.readouterr().out
    # The slots alone answer now: a process that saw the old indexes notices within a minute.
    fresh = DocumentRepository(repo.col.database)
    with pytest.raises(DuplicateContent) as repeated:
        fresh.insert(_doc(BYTES_A))
    assert repeated.value.existing.id == first.id
    assert fresh.by_idempotency_key("driver-1", "tap-3") == fresh.get(failed.id)


def test_the_embedded_installation_migrates_at_start(repo: DocumentRepository) -> None:
    repo = _as_an_older_version(repo)
    repo.col.insert_one(_doc(BYTES_A, key="k", status=Status.STORED).to_mongo())
    DocumentRepository(repo.col.database).ensure_indexes(migrate=True)
    assert not set(PRE_SLOT_INDEXES) & set(repo.col.index_information())
    assert repo.col.count_documents({IDEMPOTENCY_SLOT: {"$exists": True},
                                     CONTENT_SLOT: {"$exists": True}}) == 1
