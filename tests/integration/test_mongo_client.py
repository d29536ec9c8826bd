"""How docproc's MongoDB client is configured against the wire server."""

from __future__ import annotations

from pathlib import Path

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
