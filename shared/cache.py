"""A small JSON read-through cache: Redis when configured, a process-local dict otherwise.

The cache only ever speeds things up: every Redis failure is logged and treated as a miss,
so a Redis outage makes lookups slower, never failing.

A write to the source invalidates its key by leaving a marker there for a few seconds
rather than deleting it, and a value read from the source is only filled into a key that
holds nothing: so a read that began before the write, and got the old record, cannot put
it back after the invalidation (where a delete would let it, for the entry's whole TTL).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

import redis

log = logging.getLogger(__name__)


# How long an invalidated key takes no fill: longer than a read of the source takes.
INVALIDATION_HOLD_SECONDS = 10.0
_INVALIDATED = "\x00invalidated"  # never what json.dumps makes


class Cache(Protocol):
    def get(self, key: str) -> Any | None:
        """The value, or None on a miss (an invalidated key included)."""
        ...

    def fill(self, key: str, value: Any, ttl: float) -> None:
        """Keep a value just read from the source, unless the key holds anything (a
        recent invalidation above all)."""
        ...

    def invalidate(self, key: str) -> None:
        """The source changed: drop the value and take no fill for a few seconds."""
        ...

    def close(self) -> None: ...


class MemoryCache:
    def __init__(self) -> None:
        self._items: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            expires, payload = item
            if expires < time.monotonic():
                del self._items[key]
                return None
        return None if payload == _INVALIDATED else json.loads(payload)

    def fill(self, key: str, value: Any, ttl: float) -> None:
        # Stored as JSON so callers get a fresh copy, as they would from Redis.
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] < time.monotonic():
                self._items[key] = (time.monotonic() + ttl, json.dumps(value))

    def invalidate(self, key: str) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + INVALIDATION_HOLD_SECONDS, _INVALIDATED)

    def close(self) -> None:
        with self._lock:
            self._items.clear()


_INVALIDATED_BYTES = _INVALIDATED.encode()


class RedisCache:
    def __init__(self, url: str, prefix: str) -> None:
        # Short timeouts: a cache that makes a request wait for a dead server defeats itself.
        self.client = redis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        self.prefix = prefix

    def get(self, key: str) -> Any | None:
        try:
            raw = self.client.get(self.prefix + key)
        except redis.RedisError as exc:
            log.warning("redis get failed, reading through: %s", exc)
            return None
        if raw is None or raw == _INVALIDATED_BYTES:
            return None
        return json.loads(raw)  # type: ignore[arg-type]

    def fill(self, key: str, value: Any, ttl: float) -> None:
        try:
            self.client.set(self.prefix + key, json.dumps(value), px=int(ttl * 1000), nx=True)
        except redis.RedisError as exc:
            log.warning("redis set failed: %s", exc)

    def invalidate(self, key: str) -> None:
        try:
            self.client.set(self.prefix + key, _INVALIDATED_BYTES,
                            px=int(INVALIDATION_HOLD_SECONDS * 1000))
        except redis.RedisError as exc:
            # A stale entry could outlive a write: it expires with its TTL.
            log.warning("redis invalidation failed, entry expires with its TTL: %s", exc)

    def close(self) -> None:
        self.client.close()
