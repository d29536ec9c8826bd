"""User lookups read through Redis, are invalidated on every write, and survive Redis going away."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
import redis

from shared.cache import Cache, MemoryCache, RedisCache
from shared.config import Settings
from shared.identity import Identity
from shared.users import MAX_DEVICES, UserRepository

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
    # Provisioning was a write: the key holds the invalidation's marker for a few seconds,
    # during which lookups read MongoDB and fill nothing.
    assert raw.get(key) == b"\x00invalidated"
    assert users.get(DRIVER.user_id) is not None
    assert raw.get(key) == b"\x00invalidated"
    raw.delete(key)  # the marker's few seconds are up

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
    users.add_device(DRIVER.user_id, "tok-1", "web")
    assert raw.get(key) == b"\x00invalidated"
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
    assert users.add_device(DRIVER.user_id, "tok-2", "android")
    user = users.get(DRIVER.user_id)
    assert user is not None
    assert [d.token for d in user.devices] == ["tok-2"]


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_a_read_that_began_before_a_write_cannot_put_the_old_record_back(
    db: Any, kind: str,
) -> None:
    """A lookup reads the record, an agent disables the user and the entry is invalidated,
    then the lookup fills the cache with what it read: that old, active copy must not be
    what later lookups get (with a plain delete it stayed for the entry's 5 minutes)."""
    database, settings = db
    cache: Cache = RedisCache(settings.redis_url, settings.redis_prefix) if kind == "redis" \
        else MemoryCache()
    users = UserRepository(database, cache)
    users.provision(DRIVER)
    real_find_one = users.col.find_one

    def find_then_disable(*args: Any, **kwargs: Any) -> Any:
        found = real_find_one(*args, **kwargs)  # the old record, still active
        users.update(DRIVER.user_id, {"status": "disabled"})  # meanwhile, an agent
        return found

    users.col.find_one = find_then_disable  # type: ignore[method-assign]
    try:
        in_flight = users.get(DRIVER.user_id)
    finally:
        del users.col.find_one
    assert in_flight is not None
    assert in_flight.status == "active"  # what that one lookup read
    later = users.get(DRIVER.user_id)
    assert later is not None
    assert later.status == "disabled"
    cache.close()


def test_a_device_token_belongs_to_the_last_user_who_registered_it(db: Any) -> None:
    database, settings = db
    users = UserRepository(database, RedisCache(settings.redis_url, settings.redis_prefix))
    first, second = Identity("driver-8", "driver"), Identity("driver-9", "driver")
    users.provision(first)
    users.provision(second)
    assert users.add_device(first.user_id, "passed-on-phone", "android")
    assert users.get(first.user_id).devices[0].token == "passed-on-phone"  # type: ignore[union-attr]
    assert users.add_device(second.user_id, "passed-on-phone", "android")
    assert users.get(first.user_id).devices == []  # type: ignore[union-attr]
    assert [d.token for d in users.get(second.user_id).devices] == ["passed-on-phone"]  # type: ignore[union-attr]
    assert database["users"].count_documents({"devices.token": "passed-on-phone"}) == 1


def test_a_process_local_cache_beside_other_processes_keeps_users_briefly(
    service_settings: Callable[..., Settings],
) -> None:
    """Without Redis a process caches users alone; when it shares the database with other
    processes (MONGODB_URI), their changes never invalidate its entries, so it keeps a user
    only seconds: a user disabled through another process is refused soon, not in 5 min."""
    from docproc.runtime import build_services
    from shared.users import LOCAL_USER_CACHE_TTL, USER_CACHE_TTL

    for overrides, cache, ttl in [
        ({}, RedisCache, USER_CACHE_TTL),  # Redis: everyone's invalidations reach it
        ({"redis_url": None}, MemoryCache, LOCAL_USER_CACHE_TTL),  # alone, beside others
    ]:
        svc = build_services(service_settings(**overrides))
        try:
            assert isinstance(svc.users.cache, cache)
            assert svc.users.ttl == ttl
        finally:
            svc.close()


def test_a_user_keeps_the_ten_most_recently_seen_devices(db: Any) -> None:
    """FCM tokens are replaced over time and each push goes to every device on record: a
    new one beyond ten drops the one least recently seen, not the oldest registered."""
    database, settings = db
    users = UserRepository(database, RedisCache(settings.redis_url, settings.redis_prefix))
    users.provision(DRIVER)
    for i in range(MAX_DEVICES):
        assert users.add_device(DRIVER.user_id, f"phone-{i}", "android")
        time.sleep(0.002)  # last_seen is stored to the millisecond: no ties
    assert not users.add_device(DRIVER.user_id, "phone-0", "android")  # seen again
    assert users.add_device(DRIVER.user_id, "phone-new", "ios")
    user = users.get(DRIVER.user_id)
    assert user is not None
    tokens = {d.token for d in user.devices}
    assert len(tokens) == MAX_DEVICES == 10
    assert tokens == {"phone-0", "phone-new"} | {f"phone-{i}" for i in range(2, MAX_DEVICES)}
