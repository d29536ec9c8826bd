"""The embedded event bus: RabbitMQ's semantics for one process with no broker installed.

Each subscription gets its own queue and worker threads; a failed event is retried after the
same backoff delays as on RabbitMQ and then dead-lettered, with its reason, to
``<data dir>/dead-letters/<function>.jsonl``. Events cross the bus in their structured JSON
form, as they would cross a wire, so a handler never shares objects with the publisher.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudevents.conversion import to_json
from cloudevents.http import CloudEvent, from_json

from events.publisher import PublishError
from events.subscriptions import RetryPolicy, Subscription, describe

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Delayed:
    due: float
    seq: int
    name: str
    payload: bytes
    attempt: int


class InProcessBus:
    def __init__(self, policy: RetryPolicy, dead_letter_dir: Path, concurrency: int = 2) -> None:
        self.policy = policy
        self.dead_letter_dir = dead_letter_dir
        self.concurrency = concurrency
        self._subs: dict[str, Subscription] = {}
        self._queues: dict[str, queue.Queue[tuple[bytes, int] | None]] = {}
        self._delayed: list[_Delayed] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._inflight = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def subscribe(self, sub: Subscription) -> None:
        self._subs[sub.name] = sub
        self._queues[sub.name] = queue.Queue()

    def start(self) -> None:
        for name in self._subs:
            for i in range(self.concurrency):
                t = threading.Thread(target=self._worker, args=(name,), daemon=True,
                                     name=f"bus-{name}-{i}")
                t.start()
                self._threads.append(t)
        t = threading.Thread(target=self._scheduler, daemon=True, name="bus-scheduler")
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
        for q in self._queues.values():
            for _ in range(self.concurrency):
                q.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def publish(self, event: CloudEvent) -> None:
        targets = [s.name for s in self._subs.values() if event["type"] in s.types]
        if not targets:
            # RabbitMQ's mandatory flag would refuse it too: nobody would ever see it.
            raise PublishError(f"no subscriber for {event['type']}")
        payload = to_json(event)
        with self._cond:
            self._inflight += len(targets)
        for name in targets:
            self._queues[name].put((payload, 1))

    def close(self) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once no event is queued, running or waiting for a retry."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _done(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def _worker(self, name: str) -> None:
        sub = self._subs[name]
        q = self._queues[name]
        while True:
            item = q.get()
            if item is None:
                return
            payload, attempt = item
            try:
                event = from_json(payload)
                sub.handler(event)
            except Exception as exc:
                self._failed(name, payload, attempt, exc)
            else:
                self._done()

    def _failed(self, name: str, payload: bytes, attempt: int, exc: BaseException) -> None:
        delay = self.policy.delay_after(attempt, exc)
        log.warning("%s: handler failed (attempt %d): %s", name, attempt, describe(exc))
        if delay is None:
            self._dead_letter(name, payload, attempt, exc)
            self._done()
            return
        with self._cond:
            heapq.heappush(self._delayed, _Delayed(time.monotonic() + delay, next(self._seq),
                                                   name, payload, attempt + 1))
            self._cond.notify_all()

    def _scheduler(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                while self._delayed and self._delayed[0].due <= now:
                    item = heapq.heappop(self._delayed)
                    self._queues[item.name].put((item.payload, item.attempt))
                timeout = self._delayed[0].due - now if self._delayed else None
                self._cond.wait(timeout)

    def _dead_letter(self, name: str, payload: bytes, attempt: int, exc: BaseException) -> None:
        event: Any
        try:
            event = json.loads(payload)
        except ValueError:
            event = payload.decode(errors="replace")
        record = {
            "function": name,
            "reason": describe(exc),
            "attempts": attempt,
            "dead_lettered_at": datetime.now(UTC).isoformat(),
            "event": event,
        }
        self.dead_letter_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.dead_letter_dir / f"{name}.jsonl"
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        event_id = event.get("id") if isinstance(event, dict) else None
        log.error("%s: dead-lettered event %s after %d attempt(s): %s", name, event_id, attempt,
                  describe(exc))

    def dead_letters(self, name: str) -> list[dict[str, Any]]:
        path = self.dead_letter_dir / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]
