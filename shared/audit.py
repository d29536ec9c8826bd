"""The audit trail: an append-only record of administrative actions (who, what, when, from
which request). The repository offers no way to change or remove an entry."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import DESCENDING
from pymongo.collection import Collection
from pymongo.database import Database

from shared.documents import utcnow
from shared.identity import Identity
from shared.pagination import encode_cursor, newest_first_after


class AuditEntry(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(alias="_id")
    at: datetime
    actor: str
    actor_role: str
    action: str
    target_type: str
    target_id: str
    request_id: str
    details: dict[str, Any] = Field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        body = self.model_dump(mode="json", by_alias=False)
        body["document_id"] = self.target_id if self.target_type == "document" else None
        return body


class AuditLog:
    def __init__(self, db: Database[dict[str, Any]]) -> None:
        self.col: Collection[dict[str, Any]] = db["audit"]

    def ensure_indexes(self) -> None:
        self.col.create_index([("at", DESCENDING), ("_id", DESCENDING)], name="newest")
        self.col.create_index([("actor", 1), ("at", DESCENDING), ("_id", DESCENDING)],
                              name="actor_newest")
        self.col.create_index([("target_type", 1), ("target_id", 1), ("at", DESCENDING),
                               ("_id", DESCENDING)], name="target_newest")

    def record(self, actor: Identity, action: str, target_type: str, target_id: str,
               request_id: str, **details: Any) -> AuditEntry:
        entry = AuditEntry(
            _id=uuid.uuid4().hex, at=utcnow(), actor=actor.user_id, actor_role=actor.role,
            action=action, target_type=target_type, target_id=target_id,
            request_id=request_id, details=details,
        )
        self.col.insert_one(entry.model_dump(by_alias=True))
        return entry

    def page(self, limit: int, cursor: str | None, actor: str | None = None,
             document_id: str | None = None) -> tuple[list[AuditEntry], str | None]:
        query: dict[str, Any] = newest_first_after(cursor, "at")
        if actor:
            query["actor"] = actor
        if document_id:
            query["target_type"] = "document"
            query["target_id"] = document_id
        raw = list(self.col.find(query).sort([("at", DESCENDING), ("_id", DESCENDING)])
                   .limit(limit + 1))
        entries = [AuditEntry.model_validate(r) for r in raw[:limit]]
        more = len(raw) > limit
        return entries, encode_cursor(entries[-1].at, entries[-1].id) if more else None
