"""Notification deliveries: the idempotency record that keeps a push from being sent twice.

One record per announced outcome (document id + status). A handler claims it with a lease
(the in-progress state) under a token of its own (``holder``); devices are marked sent one
by one, so a retry after a partial failure only sends to the devices that have not had the
message yet. A holder makes sure its lease outlasts a send before it starts one (``hold``),
and releases only its own lease: a claim that ran out and was taken over by another worker
neither sends beside it nor frees its lease.

A device is recorded by a digest of its push token (``device_key``), never the token: a
token is what lets anyone who holds it, with the project's credentials, push to that phone,
and delivery records outlive the devices (the user's record drops a token as soon as FCM
says it is gone). Registration tokens are long random strings, so the digest tells no one
the token.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from shared.documents import utcnow

RELEASED = datetime(1970, 1, 1, tzinfo=UTC)
COMPLETED = datetime(9999, 1, 1, tzinfo=UTC)
DUPLICATE_KEY = 11000
# Indexes earlier versions made that nothing queries: the claim's whole filter
# ({_id, lease_until}; both servers look the `_id` up without it) and `document_id`.
RETIRED_INDEXES = ("id_lease", "document")


class DeliveryInProgress(Exception):
    """Another worker holds the lease; the event is retried, no sooner than the lease ends
    (``retry_after``), so that retries do not run out while a crashed worker's lease does."""

    def __init__(self, key: str, retry_after: float | None = None) -> None:
        super().__init__(key)
        self.retry_after = retry_after


# A finished delivery: its key, its outcome, the devices reached in its last round (their
# push tokens and FCM message ids).
Completion = tuple[str, dict[str, Any], list[tuple[str, str | None]] | None]


def device_key(token: str) -> str:
    """How a delivery record names a device: the first 128 bits of its token's SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _holder() -> str:
    return uuid.uuid4().hex


def _seconds_until(when: Any, now: datetime) -> float | None:
    """Seconds from ``now`` to a lease's end as stored (the server may drop the zone)."""
    if not isinstance(when, datetime):
        return None
    end = when if when.tzinfo else when.replace(tzinfo=UTC)
    return max((end - now).total_seconds(), 0.0)


def _sent_devices(raw: dict[str, Any]) -> set[str]:
    # Records written before device keys hold the token itself.
    return {s["device"] if "device" in s else device_key(s["token"])
            for s in raw.get("sent", [])}


def _sent_entries(sent: list[tuple[str, str | None]], now: datetime) -> list[dict[str, Any]]:
    return [{"device": device_key(t), "message_id": m, "at": now} for t, m in sent]


@dataclass
class Delivery:
    key: str
    completed: bool
    sent_devices: set[str] = field(default_factory=set)  # device_key of each
    holder: str | None = None  # this claim's token (None: completed, nothing held)
    lease_until: datetime | None = None

    def owes(self, token: str) -> bool:
        """Whether the device with this token has not had the message yet."""
        return device_key(token) not in self.sent_devices


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
        holder = _holder()
        try:
            # The first attempt (nearly every one) creates the record: an insert costs the
            # database less than an upsert, which looks for a record before it inserts.
            self.col.insert_one(self._record(key, document_id, owner, now, lease, holder))
            return self._fresh(key, holder, now, lease)  # nothing sent yet
        except DuplicateKeyError:
            return self._claim_existing(key, now, lease)

    def claim_many(self, claims: list[tuple[str, str, str]], lease: float,
                   ) -> list[Delivery | Exception]:
        """``claim`` for (key, document id, owner) triples with distinct keys, the first
        attempts in one insert: each one's delivery, or why it cannot be claimed now."""
        if not claims:
            return []
        now = utcnow()
        holders = [_holder() for _ in claims]
        taken: dict[int, Exception | None] = {}
        try:
            self.col.insert_many([self._record(key, doc_id, owner, now, lease, holder)
                                  for (key, doc_id, owner), holder in zip(claims, holders,
                                                                          strict=True)],
                                 ordered=False)
        except BulkWriteError as exc:
            for error in exc.details.get("writeErrors", []):
                duplicate = error.get("code") == DUPLICATE_KEY
                taken[error["index"]] = None if duplicate else exc
        results: list[Delivery | Exception] = []
        for i, (key, _, _) in enumerate(claims):
            if i not in taken:
                results.append(self._fresh(key, holders[i], now, lease))
                continue
            error = taken[i]
            if error is not None:
                results.append(error)
                continue
            try:
                results.append(self._claim_existing(key, now, lease))
            except Exception as exc:  # DeliveryInProgress above all: that event retries
                results.append(exc)
        return results

    @staticmethod
    def _record(key: str, document_id: str, owner: str, now: datetime,
                lease: float, holder: str) -> dict[str, Any]:
        return {"_id": key, "document_id": document_id, "owner": owner, "state": "in_progress",
                "holder": holder, "lease_until": now + timedelta(seconds=lease), "attempts": 1,
                "sent": [], "created_at": now, "updated_at": now}

    @staticmethod
    def _fresh(key: str, holder: str, now: datetime, lease: float) -> Delivery:
        return Delivery(key=key, completed=False, holder=holder,
                        lease_until=now + timedelta(seconds=lease))

    def _claim_existing(self, key: str, now: datetime, lease: float) -> Delivery:
        # Released records lease until the epoch and completed ones until the end of time,
        # so one range on lease_until says "free to claim".
        holder = _holder()
        result = self.col.update_one(
            {"_id": key, "lease_until": {"$lt": now}},
            {"$set": {"state": "in_progress", "holder": holder,
                      "lease_until": now + timedelta(seconds=lease), "updated_at": now},
             "$inc": {"attempts": 1}},
        )
        # A separate read, as find_one_and_update costs SecantusDB time in proportion to the
        # collection: what an earlier attempt already sent, or why the claim failed.
        raw = self.col.find_one({"_id": key}) or {}
        if result.matched_count == 1:
            delivery = self._fresh(key, holder, now, lease)
            delivery.sent_devices = _sent_devices(raw)
            return delivery
        if raw.get("state") == "completed":
            return Delivery(key=key, completed=True)
        raise DeliveryInProgress(key, _seconds_until(raw.get("lease_until"), now))

    def hold(self, delivery: Delivery, lease: float, needed: float) -> None:
        """Make sure ``delivery``'s lease lasts ``needed`` seconds more (a send's worst
        case) before a send starts, renewing it for ``lease`` seconds when it would not.
        Raises DeliveryInProgress when the lease ran out and another worker took it."""
        now = utcnow()
        if delivery.lease_until is not None and \
                delivery.lease_until - now >= timedelta(seconds=needed):
            return
        until = now + timedelta(seconds=lease)
        renewed = self.col.update_one({"_id": delivery.key, "holder": delivery.holder,
                                       "state": "in_progress"},
                                      {"$set": {"lease_until": until, "updated_at": now}})
        if renewed.matched_count != 1:
            raise DeliveryInProgress(delivery.key, lease)
        delivery.lease_until = until

    def mark_sent(self, key: str, sent: list[tuple[str, str | None]]) -> None:
        """Record devices (token, FCM message id) that have the message, so a retry
        skips them."""
        if sent:
            now = utcnow()
            self.col.update_one({"_id": key},
                                {"$push": {"sent": {"$each": _sent_entries(sent, now)}}})

    def complete(self, key: str, outcome: dict[str, Any],
                 sent: list[tuple[str, str | None]] | None = None) -> None:
        """Done; the devices reached in this last round are recorded in the same write."""
        self.col.update_one({"_id": key}, self._completion(outcome, sent))

    def complete_many(self, completions: list[Completion]) -> None:
        """``complete`` for several deliveries, in one round trip."""
        if len(completions) == 1:
            self.complete(*completions[0])
        elif completions:
            self.col.bulk_write([UpdateOne({"_id": key}, self._completion(outcome, sent))
                                 for key, outcome, sent in completions], ordered=False)

    @staticmethod
    def _completion(outcome: dict[str, Any],
                    sent: list[tuple[str, str | None]] | None) -> dict[str, Any]:
        now = utcnow()
        update: dict[str, Any] = {"$set": {"state": "completed", "lease_until": COMPLETED,
                                           "completed_at": now, "outcome": outcome}}
        if sent:
            update["$push"] = {"sent": {"$each": _sent_entries(sent, now)}}
        return update

    def release(self, key: str, error: str, holder: str | None = None) -> None:
        """Free the lease for a retry; with ``holder``, only while that claim holds it (a
        claim that ran out must not free the lease of the worker that took over)."""
        match: dict[str, Any] = {"_id": key} if holder is None else {"_id": key,
                                                                     "holder": holder}
        self.col.update_one(match, {"$set": {"lease_until": RELEASED, "last_error": error}})

    def get(self, key: str) -> dict[str, Any] | None:
        return self.col.find_one({"_id": key})
