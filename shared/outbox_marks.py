"""Confirmed events taken out of their records' outboxes in batches.

Once the broker confirmed an event, the record only has to learn it so the outbox relay does
not send it again after the grace period. That write is off every latency path and, on the
SecantusDB server, a write command of its own costs about twice what one record's change
inside a batched one does (bench/README.md, Findings 13), so marks wait up to ``linger``
seconds and go out together as one ``update_many``.

Nothing is lost by waiting: until a mark is written the event stays in the outbox with its
due time set, so if the write fails or the process dies first, the relay publishes the event
again after the grace period, and consumers take the duplicate as the no-op it is.
"""

from __future__ import annotations

import logging
import threading
import time

from shared.documents import DocumentRepository

log = logging.getLogger(__name__)

Mark = tuple[str, str]  # (document id, event id)


class PublishedMarks:
    def __init__(self, documents: DocumentRepository, linger: float = 0.1,
                 batch: int = 64) -> None:
        self.documents = documents
        self.linger = linger
        self.batch = batch
        self._pending: list[Mark] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, doc_id: str, event_id: str) -> None:
        """Record that the broker confirmed ``event_id``; written within ``linger`` seconds."""
        if self.linger <= 0:
            self._write([(doc_id, event_id)])
            return
        with self._cond:
            if self._closed:
                write_now = True
            else:
                write_now = False
                self._pending.append((doc_id, event_id))
                if self._thread is None:
                    # Started on first use: an idle process (or one that never publishes)
                    # keeps no thread. Services are built in each gunicorn worker, after
                    # the fork, so no process inherits another's writer.
                    self._thread = threading.Thread(target=self._run, name="outbox-marks",
                                                    daemon=True)
                    self._thread.start()
                if len(self._pending) == 1 or len(self._pending) >= self.batch:
                    self._cond.notify()
        if write_now:
            self._write([(doc_id, event_id)])

    def flush(self) -> None:
        """Write every pending mark now, in the caller's thread."""
        with self._cond:
            taken, self._pending = self._pending, []
        for start in range(0, len(taken), self.batch):
            self._write(taken[start:start + self.batch])

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return  # close() writes what is left
                deadline = time.monotonic() + self.linger
                while len(self._pending) < self.batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                taken, self._pending = self._pending[:self.batch], self._pending[self.batch:]
            self._write(taken)

    def _write(self, marks: list[Mark]) -> None:
        try:
            self.documents.published_many(marks)
        except Exception as exc:
            # The events stay in their outboxes, due: the relay sends them again later.
            log.warning("could not record %d confirmed event(s) (%s); the outbox relay will "
                        "publish them again after the grace period", len(marks), exc)
