"""One live document per owner and content: the unique index that answers a repeated upload
with the first copy, even when the repeats arrive together."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest

from shared.documents import (
    PRE_LIVE_CONTENT_INDEX,
    Document,
    DocumentRepository,
    DuplicateContent,
    Status,
    utcnow,
)
from tests.services import MongoServer, documents_repository, unique

pytestmark = pytest.mark.services

BYTES_A = "a" * 64
BYTES_B = "b" * 64


@pytest.fixture
def repo(mongo: MongoServer) -> Iterator[DocumentRepository]:
    with documents_repository(mongo, "docproc_live_content_") as repository:
        yield repository


def _doc(sha256: str, owner: str = "driver-1", *, live: bool = True,
         age: timedelta = timedelta(0)) -> Document:
    when = utcnow() - age
    return Document(_id=unique("doc-"), owner=owner, filename="pod.pdf",
                    declared_type="application/pdf", size=3, sha256=sha256,
                    live_sha256=sha256 if live else None, created_at=when, updated_at=when,
                    wrapped_key={"provider": "local"}, upload_event_id=unique("evt-"))


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
    outcome = repo.finish(failed, Status.FAILED, reason="integrity check")
    assert outcome is not None
    assert outcome.live_sha256 is None
    assert "live_sha256" not in (repo.col.find_one({"_id": failed.id}) or {"live_sha256": 1})
    retried = _doc(BYTES_B)
    repo.insert(retried)  # a failed upload may be tried again

    assert repo.tombstone(retried.id, by="agent-1") is not None
    assert repo.tombstone(rejected.id, by="agent-1") is not None
    for sha256 in (BYTES_A, BYTES_B):
        assert repo.live_with_content("driver-1", sha256) is None
        repo.insert(_doc(sha256))
    assert repo.col.count_documents({"live_sha256": {"$exists": True}}) == 2


def test_an_older_installation_gets_its_records_marked_once(repo: DocumentRepository) -> None:
    # As earlier versions left it: no live_sha256 anywhere, the index that found repeats,
    # and two live copies of the same bytes that a double tap let in.
    repo.col.drop_index("owner_live_sha256")
    repo.col.create_index([("owner", 1), ("sha256", 1), ("status", 1)],
                          name=PRE_LIVE_CONTENT_INDEX)
    first = _doc(BYTES_A, live=False, age=timedelta(minutes=5))
    second = _doc(BYTES_A, live=False, age=timedelta(minutes=1))
    other = _doc(BYTES_B, live=False, age=timedelta(minutes=3))
    failed = _doc("c" * 64, live=False).model_copy(update={"status": Status.FAILED})
    for doc in (second, first, other, failed):
        repo.col.insert_one(doc.to_mongo())

    repo.ensure_indexes()
    marked = {raw["_id"]: raw.get("live_sha256")
              for raw in repo.col.find({}, {"live_sha256": 1})}
    assert marked == {first.id: BYTES_A, second.id: None, other.id: BYTES_B, failed.id: None}
    assert PRE_LIVE_CONTENT_INDEX not in repo.col.index_information()
    with pytest.raises(DuplicateContent) as refused:
        repo.insert(_doc(BYTES_A))
    assert refused.value.existing.id == first.id  # the oldest copy answers repeats
    assert repo.mark_live_content() == 0  # marking again changes nothing
