"""Users (the seed's User Service): Kong consumers, their role and status, their FCM device
tokens. MongoDB holds them; lookups read through the cache, and every write invalidates it."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database

from shared.cache import Cache
from shared.documents import utcnow
from shared.identity import Identity, Role
from shared.pagination import decode_cursor, encode_cursor

Platform = Literal["android", "ios", "web"]
Status = Literal["active", "disabled"]
USER_CACHE_TTL = 300.0
# For a cache of this process alone while other processes change the same users (a
# database they share, no Redis): their invalidations never reach it, so it may only hold
# a user this long past a change made elsewhere.
LOCAL_USER_CACHE_TTL = 5.0
# A user's phones and browsers; one more registered drops the least recently seen.
MAX_DEVICES = 10
_RANK = {"driver": 0, "agent": 1}


def device_id(token: str) -> str:
    """A stable handle for a token, so the token itself (a credential) never sits in a URL."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class Device(BaseModel):
    id: str
    token: str
    platform: Platform
    added_at: datetime
    last_seen: datetime


class User(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(alias="_id")
    # The role Kong's ACL groups gave the consumer when last seen.
    role: Role
    # An agent may restrict a consumer to driver rights; Kong's groups stay the ceiling.
    role_limit: Role | None = None
    display_name: str | None = None
    status: Status = "active"
    created_at: datetime
    updated_at: datetime | None = None
    devices: list[Device] = Field(default_factory=list)

    def effective_role(self, kong_role: Role) -> Role:
        if self.role_limit is not None and _RANK[self.role_limit] < _RANK[kong_role]:
            return self.role_limit
        return kong_role

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.effective_role(self.role),
            "kong_role": self.role,
            "role_limit": self.role_limit,
            "display_name": self.display_name,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "devices": [{"id": d.id, "platform": d.platform, "added_at": d.added_at.isoformat(),
                         "last_seen": d.last_seen.isoformat()} for d in self.devices],
        }


class UserRepository:
    def __init__(self, db: Database[dict[str, Any]], cache: Cache,
                 ttl: float = USER_CACHE_TTL) -> None:
        self.col: Collection[dict[str, Any]] = db["users"]
        self.cache = cache
        self.ttl = ttl

    def ensure_indexes(self) -> None:
        self.col.create_index([("devices.token", ASCENDING)], name="device_token")
        self.col.create_index([("role", ASCENDING), ("_id", ASCENDING)], name="role_id")
        self.col.create_index([("status", ASCENDING), ("_id", ASCENDING)], name="status_id")

    def get(self, user_id: str) -> User | None:
        cached = self.cache.get(_key(user_id))
        if cached is not None:
            return User.model_validate(cached)
        raw = self.col.find_one({"_id": user_id})
        if raw is None:
            return None
        user = User.model_validate(raw)
        self.cache.fill(_key(user_id), user.model_dump(mode="json", by_alias=True), self.ttl)
        return user

    def ensure(self, identity: Identity) -> User:
        """The caller's record, provisioned on first sight and kept in step with Kong's groups."""
        user = self.get(identity.user_id)
        if user is None or user.role != identity.role:
            self.provision(identity)
            user = self.get(identity.user_id)
            assert user is not None
        return user

    def provision(self, identity: Identity) -> None:
        now = utcnow()
        result = self.col.update_one(
            {"_id": identity.user_id},
            {
                "$setOnInsert": {"created_at": now, "status": "active", "devices": []},
                "$set": {"role": identity.role},
            },
            upsert=True,
        )
        if result.upserted_id is not None or result.modified_count:
            self.cache.invalidate(_key(identity.user_id))

    def update(self, user_id: str, changes: dict[str, Any]) -> User | None:
        raw = self.col.find_one_and_update(
            {"_id": user_id}, {"$set": {**changes, "updated_at": utcnow()}},
            return_document=ReturnDocument.AFTER,
        )
        self.cache.invalidate(_key(user_id))
        return User.model_validate(raw) if raw else None

    def page(self, limit: int, cursor: str | None, role: str | None = None,
             status: str | None = None) -> tuple[list[User], str | None]:
        query: dict[str, Any] = {}
        if cursor is not None:
            query["_id"] = {"$gt": decode_cursor(cursor, 1)[0]}
        if role:
            query["role"] = role
        if status:
            query["status"] = status
        raw = list(self.col.find(query).sort("_id", ASCENDING).limit(limit + 1))
        users = [User.model_validate(r) for r in raw[:limit]]
        return users, encode_cursor(users[-1].id) if len(raw) > limit else None

    def add_device(self, user_id: str, token: str, platform: Platform) -> bool:
        """Register a token on an existing user; repeating it only refreshes last_seen. True
        when it was new.

        Takes the id alone: the caller's identity is the effective one (a role limit
        applied), and provisioning from it would overwrite the Kong group on record."""
        now = utcnow()
        refreshed = self.col.update_one(
            {"_id": user_id, "devices.token": token},
            {"$set": {"devices.$.last_seen": now, "devices.$.platform": platform}},
        )
        added = False
        if refreshed.matched_count == 0:
            device = {"id": device_id(token), "token": token, "platform": platform,
                      "added_at": now, "last_seen": now}
            # Beyond MAX_DEVICES the least recently seen goes: FCM tokens are replaced
            # over time, and every push of a user's is one send to each device on record.
            result = self.col.update_one(
                {"_id": user_id, "devices.token": {"$ne": token}},
                {"$push": {"devices": {"$each": [device], "$sort": {"last_seen": 1},
                                       "$slice": -MAX_DEVICES}}},
            )
            added = result.modified_count == 1
        self.cache.invalidate(_key(user_id))
        # A token reaches one phone: registered here, it is no longer any other user's (a
        # phone passed on, or signed into another account), whose pushes would otherwise
        # keep arriving on it. After the push, so that two at once leave it to at most one.
        others = [raw["_id"] for raw in self.col.find(
            {"devices.token": token, "_id": {"$ne": user_id}}, {"_id": 1})]
        if others:
            self.col.update_many({"_id": {"$in": others}},
                                 {"$pull": {"devices": {"token": token}}})
            for other in others:
                self.cache.invalidate(_key(other))
        return added

    def remove_device(self, user_id: str, device: str) -> bool:
        result = self.col.update_one({"_id": user_id}, {"$pull": {"devices": {"id": device}}})
        self.cache.invalidate(_key(user_id))
        return result.modified_count == 1

    def remove_tokens(self, user_id: str, tokens: list[str]) -> int:
        if not tokens:
            return 0
        result = self.col.update_one(
            {"_id": user_id}, {"$pull": {"devices": {"token": {"$in": tokens}}}}
        )
        self.cache.invalidate(_key(user_id))
        return result.modified_count


def _key(user_id: str) -> str:
    return f"user:{user_id}"
