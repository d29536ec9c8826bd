"""User lookups read through Redis, are invalidated on every write, and survive Redis going away."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
import redis

from shared.cache import RedisCache
from shared.config import Settings
from shared.identity import Identity
from shared.users import UserRepository

pytestmark = pytest.mark.services
DRIVER = Identity("driver-7", "driver")


@pytest.fixture
def db(service_settings: Callable[..., Settings]) -> Iterator[Any]:
    settings = service_settings()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(settings.mongodb_uri)
    yield client[settings.mongodb_database], settings
    client.close()


def test_lookups_are_served_from_redis_and_invalidated_on_write(db: Any) -> None:
    database, settings = db
    cache = RedisCache(settings.redis_url, settings.redis_prefix)
    users = UserRepository(database, cache)
    users.provision(DRIVER)
    raw = redis.Redis.from_url(settings.redis_url)
    key = f"{settings.redis_prefix}user:{DRIVER.user_id}"
    assert raw.get(key) is None

    assert users.get(DRIVER.user_id) is not None
    cached: Any = raw.get(key)
    assert cached is not None
    assert json.loads(cached)["_id"] == DRIVER.user_id
    ttl: Any = raw.pttl(key)
    assert 0 < ttl <= 300_000

    # A change behind the repository's back is not seen: the answer really comes from Redis.
    database["users"].update_one({"_id": DRIVER.user_id}, {"$set": {"status": "disabled"}})
    user = users.get(DRIVER.user_id)
    assert user is not None
    assert user.status == "active"

    # A write through the repository invalidates the entry; the next read is fresh.
    users.add_device(DRIVER, "tok-1", "web")
    assert raw.get(key) is None
    fresh = users.get(DRIVER.user_id)
    assert fresh is not None
    assert fresh.status == "disabled"
    assert [d.token for d in fresh.devices] == ["tok-1"]
    users.remove_tokens(DRIVER.user_id, ["tok-1"])
    after = users.get(DRIVER.user_id)
    assert after is not None
    assert after.devices == []
    raw.close()
    cache.close()


def test_redis_outage_degrades_to_mongodb_reads(db: Any) -> None:
    database, _ = db
    # Nothing listens on port 1: every cache call fails fast and falls through.
    users = UserRepository(database, RedisCache("redis://127.0.0.1:1/0", "x:"))
    users.provision(DRIVER)
    assert users.add_device(DRIVER, "tok-2", "android")
    user = users.get(DRIVER.user_id)
    assert user is not None
    assert [d.token for d in user.devices] == ["tok-2"]
