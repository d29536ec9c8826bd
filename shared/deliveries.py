"""Notification deliveries: the idempotency record that keeps a push from being sent twice.

One record per announced outcome (document id + status). A handler claims it with a lease
(the in-progress state); tokens are marked sent one by one, so a retry after a partial
failure only sends to the devices that have not had the message yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from shared.documents import utcnow

RELEASED = datetime(1970, 1, 1, tzinfo=UTC)
COMPLETED = datetime(9999, 1, 1, tzinfo=UTC)
# Indexes earlier versions made that nothing queries: the claim's whole filter
# ({_id, lease_until}; both servers look the `_id` up without it) and `document_id`.
RETIRED_INDEXES = ("id_lease", "document")


class DeliveryInProgress(Exception):
    """Another worker holds the lease; the event is retried later."""


@dataclass
class Delivery:
    key: str
    completed: bool
    sent_tokens: set[str] = field(default_factory=set)


class DeliveryRepository:
    def __init__(self, db: Database[dict[str, Any]]) -> None:
        self.col: Collection[dict[str, Any]] = db["deliveries"]

    def ensure_indexes(self) -> None:
        """Only `_id`: every read and write of a delivery names its key. Each further index
        costs both of a push's writes (bench/README.md, Findings 26), so the ones earlier
        versions made are dropped."""
        existing = set(self.col.index_information())
        for name in RETIRED_INDEXES:
            if name in existing:
                self.col.drop_index(name)

    def claim(self, key: str, document_id: str, owner: str, lease: float) -> Delivery:
        now = utcnow()
        until = now + timedelta(seconds=lease)
        try:
            # The first attempt (nearly every one) creates the record: an insert costs the
            # database less than an upsert, which looks for a record before it inserts.
            self.col.insert_one({
                "_id": key, "document_id": document_id, "owner": owner, "state": "in_progress",
                "lease_until": until, "attempts": 1, "sent": [], "created_at": now,
                "updated_at": now,
            })
            return Delivery(key=key, completed=False)  # nothing sent yet
        except DuplicateKeyError:
            pass
        # Released records lease until the epoch and completed ones until the end of time,
        # so one range on lease_until says "free to claim".
        result = self.col.update_one(
            {"_id": key, "lease_until": {"$lt": now}},
            {"$set": {"state": "in_progress", "lease_until": until, "updated_at": now},
             "$inc": {"attempts": 1}},
        )
        # A separate read, as find_one_and_update costs SecantusDB time in proportion to the
        # collection: what an earlier attempt already sent, or why the claim failed.
        raw = self.col.find_one({"_id": key}) or {}
        if result.matched_count == 1:
            return Delivery(key=key, completed=False,
                            sent_tokens={s["token"] for s in raw.get("sent", [])})
        if raw.get("state") == "completed":
            return Delivery(key=key, completed=True)
        raise DeliveryInProgress(key)

    def mark_sent(self, key: str, sent: list[tuple[str, str | None]]) -> None:
        """Record devices that have the message, so a retry skips them."""
        if sent:
            now = utcnow()
            self.col.update_one({"_id": key}, {"$push": {"sent": {"$each": [
                {"token": t, "message_id": m, "at": now} for t, m in sent]}}})

    def complete(self, key: str, outcome: dict[str, Any],
                 sent: list[tuple[str, str | None]] | None = None) -> None:
        """Done; the devices reached in this last round are recorded in the same write."""
        now = utcnow()
        update: dict[str, Any] = {"$set": {"state": "completed", "lease_until": COMPLETED,
                                           "completed_at": now, "outcome": outcome}}
        if sent:
            update["$push"] = {"sent": {"$each": [
                {"token": t, "message_id": m, "at": now} for t, m in sent]}}
        self.col.update_one({"_id": key}, update)

    def release(self, key: str, error: str) -> None:
        self.col.update_one(
            {"_id": key}, {"$set": {"lease_until": RELEASED, "last_error": error}}
        )

    def get(self, key: str) -> dict[str, Any] | None:
        return self.col.find_one({"_id": key})
