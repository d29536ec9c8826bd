"""The documents collection: one record per upload, from `processing` to its outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from shared.keys import WrappedKey


class Status(StrEnum):
    PROCESSING = "processing"
    STORED = "stored"
    REJECTED = "rejected"
    FAILED = "failed"
    DELETED = "deleted"


KINDS = ("proof_of_delivery", "bill_of_lading", "receipt", "photo", "other")
# The outcomes a repeated upload of the same bytes is answered with (the existing document)
# rather than recorded again; a failed or deleted document's bytes may be uploaded anew.
LIVE = (Status.PROCESSING, Status.STORED, Status.REJECTED)
LIVE_VALUES = [s.value for s in LIVE]  # as stored, for queries


class Document(BaseModel):
    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    id: str = Field(alias="_id")
    owner: str
    filename: str
    declared_type: str
    size: int
    sha256: str
    status: Status = Status.PROCESSING
    created_at: datetime
    updated_at: datetime
    # None once crypto-shredded: without it the ciphertext is noise, whoever holds a copy.
    wrapped_key: dict[str, Any] | None
    kind: str | None = None
    tags: list[str] = Field(default_factory=list)
    note: str | None = None
    deleted_at: datetime | None = None
    deleted_by: str | None = None
    media_type: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None
    # The signed download link, encrypted under the document's own data key (see README).
    download_url_enc: bytes | None = None
    download_url_expires: datetime | None = None
    idempotency_key: str | None = None
    upload_event_id: str
    # The transactional outbox: events recorded atomically with the state they announce,
    # removed once the broker confirmed them; the relay publishes what a crash left behind.
    outbox: list[dict[str, str]] = Field(default_factory=list)
    outbox_due: datetime | None = None

    @property
    def key(self) -> WrappedKey:
        if self.wrapped_key is None:
            raise DocumentShredded(self.id)
        return WrappedKey.from_doc(self.wrapped_key)

    def to_mongo(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


# How long the request that recorded an event gets to publish it before a relay steps in.
DEFAULT_OUTBOX_GRACE = timedelta(seconds=10)


@dataclass(frozen=True)
class OutboxEvent:
    id: str
    payload: str  # the CloudEvent in structured JSON

    def entry(self) -> dict[str, str]:
        return {"id": self.id, "event": self.payload}


class DocumentShredded(Exception):
    """The document was deleted and its data key destroyed."""


class DuplicateIdempotencyKey(Exception):
    def __init__(self, existing: Document) -> None:
        super().__init__(existing.id)
        self.existing = existing


class DuplicateContent(Exception):
    """The owner already has a live document with these exact bytes."""

    def __init__(self, existing: Document) -> None:
        super().__init__(existing.id)
        self.existing = existing


def utcnow() -> datetime:
    """Now, at the millisecond precision BSON keeps, so a record written with it reads back
    equal to what was written."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# Every browse filter, each ending in the page order (newest first), for MongoDB's planner.
BROWSE_INDEXES: dict[str, list[tuple[str, int]]] = {
    "owner_newest": [("owner", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
    "newest": [("created_at", DESCENDING), ("_id", DESCENDING)],
    **{f"{field}_newest": [(field, ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]
       for field in ("status", "media_type", "kind", "filename_folded")},
}
# `docproc reprocess` finds documents stuck in `processing` by status and age. MongoDB gets
# an index for it; on SecantusDB an operator's occasional collection scan costs less than
# the entry every insert and every `finish` would write: without it the server spends 13%
# less CPU on an insert and 15% less on a `finish` (bench/README.md, Findings 39).
STUCK_INDEX: dict[str, list[tuple[str, int]]] = {
    "status_updated": [("status", ASCENDING), ("updated_at", ASCENDING)]}
# Indexes earlier versions made for SecantusDB's conditional writes ({_id, status} and the
# like): its writes look the `_id` clause up without them, so they only cost every write.
RETIRED_INDEXES = ("id_status", "id_outbox_due")
# What is unique per owner is kept in single fields, each with a sparse unique index:
# `idempotency_slot` (the owner and their Idempotency-Key) and `content_slot` (the owner and
# the bytes' SHA-256, present only while the document is live, see LIVE, and removed when it
# fails or is deleted). Of two concurrent uploads the index admits one, where a look before
# the insert let both through, and SecantusDB's planner looks a sparse index up where it
# scans the collection for a partial one (bench/README.md, Findings 23).
IDEMPOTENCY_SLOT = "idempotency_slot"
CONTENT_SLOT = "content_slot"
# Indexes of versions before the slots. While one is left, an older version may still write
# records without slots (a Knative traffic split, or the other blue-green cluster on the same
# database): look-ups fall back to what those versions query, and their indexes stay for
# them. `docproc migrate`, run once no older version does, fills the slots and drops them
# (finish_migration); the embedded installation, which no other process shares, does it at
# start.
PRE_SLOT_INDEXES = ("owner_idempotency_key", "owner_sha256_status")
# How long a process goes by what it last saw of those indexes (a migration elsewhere).
PRE_SLOT_RECHECK_SECONDS = 60.0
# Attempts at recording an upload whose conflicting record keeps vanishing (deleted or failed
# between our insert and our look-up); more than two would take a concurrent storm.
INSERT_ATTEMPTS = 3


# "status is processing", spelled as an operator: status is always one string, so this is
# the plain equality, but SecantusDB then goes straight to the `_id` clause for the write's
# candidate instead of first trying every index for the pair of equalities. The write that
# ends every document costs its server a fifth less CPU (bench/README.md, Findings 31).
STILL_PROCESSING: dict[str, Any] = {"$not": {"$ne": Status.PROCESSING.value}}


# A document, the outcome it moves to, and the fields that outcome records (finish).
Outcome = tuple["Document", Status, dict[str, Any]]


def _same_ms(value: Any, when: datetime) -> bool:
    """Whether a stored time is ``when``: the server may hand it back without a time zone."""
    if not isinstance(value, datetime):
        return False
    stored: datetime = value if value.tzinfo else value.replace(tzinfo=UTC)
    return stored == when


def slot(owner: str, value: str) -> str:
    """An owner's value as one string, the owner's length first so that no other owner and
    value can spell the same."""
    return f"{len(owner)}:{owner}:{value}"


class DocumentRepository:
    def __init__(self, db: Database[dict[str, Any]],
                 outbox_grace: timedelta = DEFAULT_OUTBOX_GRACE) -> None:
        self.col: Collection[dict[str, Any]] = db["documents"]
        self.outbox_grace = outbox_grace
        self._pre_slot = False
        self._pre_slot_checked = float("-inf")

    def _saw_pre_slot(self, indexes: set[str]) -> None:
        self._pre_slot = bool(indexes & set(PRE_SLOT_INDEXES))
        self._pre_slot_checked = time.monotonic()

    def ensure_indexes(self, migrate: bool = False) -> None:
        """The indexes the queries need, for the planner of the server at hand.

        MongoDB answers a browse page by walking an index in the page's order, so it gets one
        per browse filter, and one for ``stuck``. SecantusDB (the embedded default and the
        tests' server) answers the browse queries by scanning whatever indexes exist
        (``explain``: COLLSCAN), and re-reads every index definition and rewrites every index
        entry of a record on every write: it gets neither (13 → 5 indexes cut its CPU per
        write by more than half, 5 → 4 a further 13-15%, bench/README.md). The conditional
        writes (``{_id, status}`` and the like) need none on either server: both look the
        ``_id`` up. Indexes the server at hand does not use are dropped, so an installation
        that moves between the two keeps only what it uses. With ``migrate``, records from
        before the slots get theirs (finish_migration).
        """
        for field in (IDEMPOTENCY_SLOT, CONTENT_SLOT):
            self.col.create_index(field, name=field, unique=True, sparse=True)
        self.col.create_index([("outbox_due", ASCENDING)], name="outbox_due", sparse=True)
        existing = set(self.col.index_information())
        self._saw_pre_slot(existing)
        if migrate and self._pre_slot:
            self.finish_migration()
        unwanted = list(RETIRED_INDEXES)
        mongodb_only = {**BROWSE_INDEXES, **STUCK_INDEX}
        if "secantusVersion" in self.col.database.client.admin.command("buildInfo"):
            unwanted += mongodb_only
        else:
            for name, keys in mongodb_only.items():
                self.col.create_index(keys, name=name)
        for name in unwanted:
            if name in existing:
                self.col.drop_index(name)

    def _pre_slot_records(self) -> bool:
        """Whether records without slots may exist (an index of an older version is left)."""
        if time.monotonic() - self._pre_slot_checked >= PRE_SLOT_RECHECK_SECONDS:
            self._saw_pre_slot(self.pre_slot_indexes())
        return self._pre_slot

    def pre_slot_indexes(self) -> set[str]:
        return set(self.col.index_information()) & set(PRE_SLOT_INDEXES)

    def finish_migration(self) -> int:
        """Fill the slots of records written before them, then drop the older versions'
        indexes; run once no older version writes (they would lose their unique index).
        Interrupted, it is simply run again. Returns how many slots were filled."""
        left = self.pre_slot_indexes()
        if not left:
            return 0  # done before (fill_slots alone serves a restore of an older backup)
        filled = self.fill_slots()
        for name in left:
            self.col.drop_index(name)
        self._saw_pre_slot(set())
        return filled

    def fill_slots(self) -> int:
        """Give records written before the slots existed theirs, oldest first, so that a
        repeated upload finds the first copy: a later live copy of the same bytes (a double
        tap let both in) stays as it is but is not what repeats are answered with. Returns
        how many slots were filled."""
        pending = self.col.find(
            {"$or": [
                {"idempotency_key": {"$type": "string"}, IDEMPOTENCY_SLOT: {"$exists": False}},
                {"status": {"$in": LIVE_VALUES}, CONTENT_SLOT: {"$exists": False}},
            ]},
            {"owner": 1, "idempotency_key": 1, "sha256": 1, "status": 1,
             IDEMPOTENCY_SLOT: 1, CONTENT_SLOT: 1},
        ).sort([("created_at", ASCENDING), ("_id", ASCENDING)])
        filled = 0
        for raw in pending:
            key = raw.get("idempotency_key")
            if isinstance(key, str) and IDEMPOTENCY_SLOT not in raw:
                filled += self._fill(raw["_id"], {}, IDEMPOTENCY_SLOT, slot(raw["owner"], key))
            if raw.get("status") in LIVE_VALUES and CONTENT_SLOT not in raw:
                filled += self._fill(raw["_id"], {"status": {"$in": LIVE_VALUES}}, CONTENT_SLOT,
                                     slot(raw["owner"], raw["sha256"]))
        return filled

    def _fill(self, doc_id: str, condition: dict[str, Any], field: str, value: str) -> int:
        try:
            result = self.col.update_one({"_id": doc_id, field: {"$exists": False}, **condition},
                                         {"$set": {field: value}})
        except DuplicateKeyError:
            return 0  # an older record holds the slot
        return result.modified_count

    def insert(self, doc: Document, event: OutboxEvent | None = None) -> None:
        """Record an upload, with its event in the same write.

        Raises DuplicateIdempotencyKey or DuplicateContent, naming the record that won, when
        the owner already has a record under this Idempotency-Key or a live one with these
        bytes; the unique indexes decide, so of two concurrent uploads exactly one is
        recorded. (Against records of older versions, which have no slots, it looks before it
        inserts, as those versions did.)"""
        raw = {**doc.to_mongo(), "filename_folded": doc.filename.casefold()}
        if doc.idempotency_key is not None:
            raw[IDEMPOTENCY_SLOT] = slot(doc.owner, doc.idempotency_key)
        live = doc.status in LIVE
        if live:
            raw[CONTENT_SLOT] = slot(doc.owner, doc.sha256)
        if event is not None:
            raw["outbox"] = [event.entry()]
            raw["outbox_due"] = utcnow() + self.outbox_grace
        if live and self._pre_slot_records():
            earlier = self.live_with_content(doc.owner, doc.sha256)
            if earlier is not None:
                raise DuplicateContent(earlier)
        for _ in range(INSERT_ATTEMPTS):
            try:
                self.col.insert_one(raw)
                return
            except DuplicateKeyError:
                if doc.idempotency_key is not None:
                    existing = self.by_idempotency_key(doc.owner, doc.idempotency_key)
                    if existing is not None:
                        raise DuplicateIdempotencyKey(existing) from None
                if live:
                    existing = self.live_with_content(doc.owner, doc.sha256)
                    if existing is not None:
                        raise DuplicateContent(existing) from None
                # The record we collided with failed or was deleted since: try again.
        raise RuntimeError(f"document {doc.id}: the record it collides with keeps changing")

    def get(self, doc_id: str) -> Document | None:
        raw = self.col.find_one({"_id": doc_id})
        return Document.model_validate(raw) if raw else None

    def get_many(self, doc_ids: list[str]) -> dict[str, Document]:
        """The records of these ids that exist, by id: one round trip for a batch."""
        if len(doc_ids) == 1:
            doc = self.get(doc_ids[0])
            return {} if doc is None else {doc.id: doc}
        found = (Document.model_validate(raw)
                 for raw in self.col.find({"_id": {"$in": list(doc_ids)}}))
        return {doc.id: doc for doc in found}

    def live_with_content(self, owner: str, sha256: str) -> Document | None:
        """The owner's live document with these exact bytes, if any (a repeated upload)."""
        raw = self.col.find_one({CONTENT_SLOT: slot(owner, sha256)})
        if raw is None and self._pre_slot_records():
            raw = self.col.find_one(
                {"owner": owner, "sha256": sha256, "status": {"$in": LIVE_VALUES}},
                sort=[("created_at", ASCENDING)])
        return Document.model_validate(raw) if raw else None

    def by_idempotency_key(self, owner: str, key: str) -> Document | None:
        raw = self.col.find_one({IDEMPOTENCY_SLOT: slot(owner, key)})
        if raw is None and self._pre_slot_records():
            raw = self.col.find_one({"owner": owner, "idempotency_key": key})
        return Document.model_validate(raw) if raw else None

    def finish(self, doc: Document, status: Status, **fields: Any) -> Document | None:
        """Move a `processing` document to its outcome; ``doc`` with these changes applied,
        or None when the document had already left `processing`.

        The outbox is emptied in the same write: what it still holds is the upload's event,
        which this very outcome proves was delivered (its consumer is the one finishing), so
        publishing it again could only cause a redundant redelivery, and its pending mark
        finds nothing left to write (published_many). The outcome's own event is not recorded
        here: the event being handled stays unacknowledged until it is published, so a crash
        in between redelivers it and the outcome is announced again (see
        ``record_unpublished`` for a publish that fails)."""
        return self.finish_many([(doc, status, fields)])[0]

    def finish_many(self, outcomes: list[Outcome]) -> list[Document | None]:
        """``finish`` for several documents (distinct ids) in one round trip."""
        if not outcomes:
            return []
        now = utcnow()
        changed: list[dict[str, Any]] = []
        writes: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for doc, status, fields in outcomes:
            changes: dict[str, Any] = {"status": status.value, "updated_at": now,
                                       "outbox": [], **fields}
            unset = {"outbox_due": ""}
            if status not in LIVE:
                # A failed document's bytes may be uploaded again, as a new document.
                unset[CONTENT_SLOT] = ""
            changed.append(changes)
            writes.append(({"_id": doc.id, "status": STILL_PROCESSING},
                           {"$set": changes, "$unset": unset}))
        # update_one, not find_one_and_update: on SecantusDB the latter costs time in
        # proportion to the collection, whatever the filter. No read follows: the outcome
        # and its time are what callers use, and those are exactly what this write set (an
        # agent's concurrent edit of, say, the tags is not in the returned copy).
        if len(writes) == 1:
            modified = self.col.update_one(*writes[0]).modified_count
        else:
            modified = self.col.bulk_write([UpdateOne(flt, update) for flt, update in writes],
                                           ordered=False).modified_count
        if modified == len(outcomes):
            finished = [True] * len(outcomes)
        elif modified == 0:
            finished = [False] * len(outcomes)
        else:
            # The counts do not say which: a record that shows this write's outcome and
            # time (to the millisecond) was ours.
            current = {raw["_id"]: raw for raw in self.col.find(
                {"_id": {"$in": [doc.id for doc, _, _ in outcomes]}},
                {"status": 1, "updated_at": 1})}
            finished = [
                (raw := current.get(doc.id)) is not None and raw.get("status") == status.value
                and _same_ms(raw.get("updated_at"), now)
                for doc, status, _ in outcomes]
        return [doc.model_copy(update={**changes, "status": status, "outbox_due": None})
                if done else None
                for (doc, status, _), changes, done in zip(outcomes, changed, finished,
                                                           strict=True)]

    def record_unpublished(self, doc_id: str, event: OutboxEvent) -> None:
        """An event the broker did not take: into the record's outbox, due at once, so the
        relay publishes it as soon as it can."""
        self.col.update_one({"_id": doc_id},
                            {"$push": {"outbox": event.entry()}, "$set": {"outbox_due": utcnow()}})

    def published(self, doc_id: str, event_id: str) -> None:
        """The broker confirmed the event: take it out of the record's outbox."""
        self.published_many([(doc_id, event_id)])

    def published_many(self, marks: list[tuple[str, str]]) -> int:
        """Take confirmed events, given as (document id, event id), out of their records'
        outboxes and, where that was the last one, stop the relay from looking at the record,
        in one write. (Without the second stage every document cost the relay a claim, a read
        and a write later.) Event ids are unique, so one list serves every record. Returns
        how many records still held one of the events."""
        if not marks:
            return 0
        doc_ids = sorted({doc_id for doc_id, _ in marks})
        event_ids = sorted({event_id for _, event_id in marks})
        # Only records still holding one of the events: most uploads' marks find their
        # record already finished (``finish`` empties the outbox), and a record that does not
        # match costs the server a look-up, where a match costs a rewrite of every index.
        result = self.col.update_many({"_id": {"$in": doc_ids},
                                       "outbox.id": {"$in": event_ids}}, [
            {"$set": {"outbox": {"$filter": {
                "input": {"$ifNull": ["$outbox", []]},
                "cond": {"$not": [{"$in": ["$$this.id", {"$literal": event_ids}]}]},
            }}}},
            {"$set": {"outbox_due": {"$cond": [
                {"$eq": [{"$size": "$outbox"}, 0]}, "$$REMOVE", "$outbox_due"]}}},
        ])
        return result.modified_count

    def outbox_drained(self, doc: Document) -> None:
        """Nothing left to relay: stop looking at the record, unless a new event arrived
        since it was read (which sets a new ``outbox_due``)."""
        self.col.update_one({"_id": doc.id, "outbox_due": doc.outbox_due},
                            {"$unset": {"outbox_due": ""}})

    def claim_outbox(self, lease: timedelta) -> Document | None:
        """A document with events left unpublished, leased so relays don't all take it."""
        now = utcnow()
        for raw in self.col.find({"outbox_due": {"$lte": now}}).sort("outbox_due",
                                                                     ASCENDING).limit(20):
            # Claimed only if no other relay moved the due time since we read it.
            taken = self.col.update_one({"_id": raw["_id"], "outbox_due": raw["outbox_due"]},
                                        {"$set": {"outbox_due": now + lease}})
            if taken.modified_count == 1:
                return self.get(raw["_id"])
        return None

    def reschedule_outbox(self, doc_id: str, after: timedelta) -> None:
        self.col.update_one({"_id": doc_id, "outbox_due": {"$exists": True}},
                            {"$set": {"outbox_due": utcnow() + after}})

    def stuck(self, older_than: datetime, limit: int = 1000) -> list[Document]:
        raw = self.col.find({"status": Status.PROCESSING.value, "updated_at": {"$lt": older_than}})
        return [Document.model_validate(r) for r in raw.sort("updated_at", ASCENDING).limit(limit)]

    def set_download_url(self, doc_id: str, url_enc: bytes, expires: datetime) -> None:
        self.col.update_one(
            {"_id": doc_id},
            {"$set": {"download_url_enc": url_enc, "download_url_expires": expires}},
        )

    def delete(self, doc_id: str) -> None:
        """Remove a record that was never accepted (its upload failed before the 202)."""
        self.col.delete_one({"_id": doc_id})

    def update(self, doc_id: str, changes: dict[str, Any]) -> Document | None:
        raw = self.col.find_one_and_update(
            {"_id": doc_id, "status": {"$ne": Status.DELETED.value}},
            {"$set": {**changes, "updated_at": utcnow()}},
            return_document=ReturnDocument.AFTER,
        )
        return Document.model_validate(raw) if raw else None

    def tombstone(self, doc_id: str, by: str) -> Document | None:
        """Crypto-shred: destroy the wrapped data key and the sealed link, keep who and when."""
        now = utcnow()
        raw = self.col.find_one_and_update(
            {"_id": doc_id, "status": {"$ne": Status.DELETED.value}},
            {
                "$set": {"status": Status.DELETED.value, "deleted_at": now, "deleted_by": by,
                         "updated_at": now, "wrapped_key": None},
                "$unset": {"download_url_enc": "", "download_url_expires": "",
                           CONTENT_SLOT: ""},
            },
            return_document=ReturnDocument.AFTER,
        )
        return Document.model_validate(raw) if raw else None

    def page(self, query: dict[str, Any], limit: int) -> list[Document]:
        raw = self.col.find(query).sort([("created_at", DESCENDING), ("_id", DESCENDING)])
        return [Document.model_validate(r) for r in raw.limit(limit)]
