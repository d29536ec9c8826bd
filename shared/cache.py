"""A small JSON cache: Redis when configured, a process-local dict otherwise.

The cache only ever speeds things up: every Redis failure is logged and treated as a miss,
so a Redis outage makes lookups slower, never failing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

import redis

log = logging.getLogger(__name__)


class Cache(Protocol):
    def get(self, key: str) -> Any | None: ...
    def set(self, key: str, value: Any, ttl: float) -> None: ...
    def delete(self, key: str) -> None: ...
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
        return json.loads(payload)

    def set(self, key: str, value: Any, ttl: float) -> None:
        # Stored as JSON so callers get a fresh copy, as they would from Redis.
        with self._lock:
            self._items[key] = (time.monotonic() + ttl, json.dumps(value))

    def delete(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def close(self) -> None:
        with self._lock:
            self._items.clear()


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
        return json.loads(raw) if raw is not None else None  # type: ignore[arg-type]

    def set(self, key: str, value: Any, ttl: float) -> None:
        try:
            self.client.set(self.prefix + key, json.dumps(value), px=int(ttl * 1000))
        except redis.RedisError as exc:
            log.warning("redis set failed: %s", exc)

    def delete(self, key: str) -> None:
        try:
            self.client.delete(self.prefix + key)
        except redis.RedisError as exc:
            # A stale entry could outlive a write: it expires with its TTL.
            log.warning("redis delete failed, entry expires with its TTL: %s", exc)

    def close(self) -> None:
        self.client.close()
