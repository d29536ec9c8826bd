"""How docproc's MongoDB client is configured against the wire server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import load_settings
from shared.mongo import open_mongo
from tests.services import MongoServer


@pytest.mark.parametrize(("query", "expected"), [("", True), ("?retryWrites=false", False)])
def test_a_configured_uri_decides_retryable_writes(
    tmp_path: Path, mongo: MongoServer, query: str, expected: bool
) -> None:
    # Operators tune the client through MONGODB_URI, as with any MongoDB application; an
    # option docproc forced would silently win over theirs (pymongo lets keywords override).
    settings = load_settings(data_dir=tmp_path, mongodb_uri=mongo.uri + query,
                             mongodb_database="docproc_client_options")
    handle = open_mongo(settings)
    try:
        assert handle.client.options.retry_writes is expected
        handle.db["probe"].insert_one({"_id": "written"})
        assert handle.db["probe"].find_one({"_id": "written"}) == {"_id": "written"}
    finally:
        handle.client.drop_database("docproc_client_options")
        handle.close()


def test_the_embedded_server_is_written_without_retryable_writes(tmp_path: Path) -> None:
    handle = open_mongo(load_settings(data_dir=tmp_path))
    try:
        assert handle.embedded is not None
        assert handle.client.options.retry_writes is False
    finally:
        handle.close()


def test_documents_get_the_indexes_the_secantusdb_planner_uses(mongo: MongoServer) -> None:
    import pymongo

    from shared.deliveries import DeliveryRepository
    from shared.documents import (
        BROWSE_INDEXES,
        RETIRED_INDEXES,
        STUCK_INDEX,
        DocumentRepository,
    )

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo.uri)
    db = client["docproc_index_profile"]
    try:
        # As earlier versions left them: every browse index and the stuck documents' (what
        # MongoDB's planner uses) and the whole-filter indexes for the conditional writes.
        for name, keys in {**BROWSE_INDEXES, **STUCK_INDEX}.items():
            db["documents"].create_index(keys, name=name)
        db["documents"].create_index([("_id", 1), ("status", 1)], name="id_status")
        db["documents"].create_index([("_id", 1), ("outbox_due", 1)], name="id_outbox_due")
        db["deliveries"].create_index([("_id", 1), ("lease_until", 1)], name="id_lease")
        db["deliveries"].create_index("document_id", name="document")
        DocumentRepository(db).ensure_indexes()
        DeliveryRepository(db).ensure_indexes()
        # Each index costs every write there, and no read or write of the pipeline uses these.
        assert set(db["documents"].index_information()) == {
            "_id_", "idempotency_slot", "content_slot", "outbox_due"}
        assert not set(BROWSE_INDEXES) & set(RETIRED_INDEXES)
        assert set(db["deliveries"].index_information()) == {"_id_"}
        # The reads the pipeline makes per document ride an index, not a collection scan.
        # An upload with an Idempotency-Key looks its slot up; a repeated one, its content's.
        for flt in ({"outbox_due": {"$lte": 1}}, {"_id": "x"}, {"idempotency_slot": "1:u:k"},
                    {"content_slot": "1:u:" + "0" * 64}):
            plan = db.command("explain", {"find": "documents", "filter": flt})
            assert "COLLSCAN" not in str(plan["queryPlanner"]["winningPlan"]), flt
    finally:
        client.drop_database("docproc_index_profile")
        client.close()
