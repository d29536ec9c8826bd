"""The MongoDB records of a backup: one per line, in MongoDB Extended JSON."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from typing import Any, Final

from bson import json_util
from pymongo.collection import Collection

from docproc.backup.errors import BackupError
from docproc.backup.stores import COPY_BUFFER
from docproc.runtime import Services

# Canonical mode keeps every BSON type distinct (Int64 vs int, dates as milliseconds);
# tz_aware matches the application's client, so restored dates compare equal.
JSON: Final = json_util.CANONICAL_JSON_OPTIONS.with_options(tz_aware=True, tzinfo=UTC)


def backed_up_collections(svc: Services) -> dict[str, Collection[dict[str, Any]]]:
    """The collections a backup holds, in the order they are exported (the package
    docstring, "Consistency": documents before users)."""
    return {"documents": svc.documents.col, "users": svc.users.col, "audit": svc.audit.col,
            "deliveries": svc.deliveries.col}


def lines(source: Any) -> Iterator[bytes]:
    """The lines of a stream read in large blocks (one record can be megabytes)."""
    pending = b""
    while block := source.read(COPY_BUFFER):
        pending += block
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line)
    if pending:
        yield pending


def decode(line: bytes) -> dict[str, Any]:
    record = json_util.loads(line.decode("utf-8"), json_options=JSON)
    if not isinstance(record, dict):
        raise BackupError("a backup record is not a JSON object")
    return record
