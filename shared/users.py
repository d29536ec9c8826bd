"""Users and their FCM device tokens (MongoDB), with read-through caching."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database

from shared.cache import Cache
from shared.documents import utcnow
from shared.identity import Identity

Platform = Literal["android", "ios", "web"]
USER_CACHE_TTL = 300.0


class Device(BaseModel):
    token: str
    platform: Platform
    added_at: datetime
    last_seen: datetime


class User(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(alias="_id")
    role: str
    status: Literal["active", "disabled"] = "active"
    created_at: datetime
    devices: list[Device] = Field(default_factory=list)


class UserRepository:
    def __init__(self, db: Database[dict[str, Any]], cache: Cache) -> None:
        self.col: Collection[dict[str, Any]] = db["users"]
        self.cache = cache

    def ensure_indexes(self) -> None:
        self.col.create_index([("devices.token", ASCENDING)], name="device_token")

    def get(self, user_id: str) -> User | None:
        cached = self.cache.get(_key(user_id))
        if cached is not None:
            return User.model_validate(cached)
        raw = self.col.find_one({"_id": user_id})
        if raw is None:
            return None
        user = User.model_validate(raw)
        self.cache.set(_key(user_id), user.model_dump(mode="json", by_alias=True), USER_CACHE_TTL)
        return user

    def ensure(self, identity: Identity) -> User:
        """The caller's user record, provisioned or re-roled from Kong's groups when needed."""
        user = self.get(identity.user_id)
        if user is None or user.role != identity.role:
            self.provision(identity)
            user = self.get(identity.user_id)
            assert user is not None
        return user

    def provision(self, identity: Identity) -> None:
        """Create the user on first sight; Kong's groups stay the authority for the role."""
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
            self.cache.delete(_key(identity.user_id))

    def add_device(self, identity: Identity, token: str, platform: Platform) -> bool:
        """Register a token; repeating it only refreshes last_seen. True when it was new."""
        self.provision(identity)
        now = utcnow()
        refreshed = self.col.update_one(
            {"_id": identity.user_id, "devices.token": token},
            {"$set": {"devices.$.last_seen": now, "devices.$.platform": platform}},
        )
        added = False
        if refreshed.matched_count == 0:
            device = {"token": token, "platform": platform, "added_at": now, "last_seen": now}
            result = self.col.update_one(
                {"_id": identity.user_id, "devices.token": {"$ne": token}},
                {"$push": {"devices": device}},
            )
            added = result.modified_count == 1
        self.cache.delete(_key(identity.user_id))
        return added

    def remove_tokens(self, user_id: str, tokens: list[str]) -> int:
        if not tokens:
            return 0
        result = self.col.update_one(
            {"_id": user_id}, {"$pull": {"devices": {"token": {"$in": tokens}}}}
        )
        self.cache.delete(_key(user_id))
        return result.modified_count


def _key(user_id: str) -> str:
    return f"user:{user_id}"
