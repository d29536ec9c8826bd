"""Confirmed events taken out of their records' outboxes, late and in batches.

Once the broker confirmed an event, the record only has to learn it so the outbox relay does
not send it again after the grace period. Nearly always it never has to: the upload's event
is the only one recorded in an outbox on the way (storage announces its outcome without one,
see ``docproc.outbox.publish_outcome``), and storage's ``finish`` empties the outbox when it
records the outcome, tens of milliseconds later. So each mark waits ``linger`` seconds
first; by then its record has usually been finished, the batched ``update_many`` matches
nothing for it, and on the SecantusDB server a record that does not match costs a look-up
where one that does costs a rewrite of every index entry (bench/README.md, Findings 13, 29).
Only a document still waiting for storage (a backlog longer than the linger) is written.

Batches are bounded (``batch`` marks, each written once its oldest mark has waited its
linger) so that no write holds the collection for long, and so is the memory of a process
that confirms faster than it can write: past ``MAX_PENDING_BATCHES`` full batches the writer
stops lingering, and past twice that a new mark is written by the thread that adds it, which
slows the uploads down to what the database takes.

Nothing is lost by waiting: until a mark is written the event stays in the outbox with its
due time set, so if the write fails or the process dies first, the relay publishes the event
again after the grace period, and consumers take the duplicate as the no-op it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from shared.documents import DocumentRepository
from shared.observability import OUTBOX_MARKS

log = logging.getLogger(__name__)

Mark = tuple[str, str]  # (document id, event id)
# Marks a write: SecantusDB's CPU per mark is lowest around 16, written or moot
# (bench/query_scaling.py); a larger batch's lists of ids are walked for every record.
BATCH = 16
# Past this many full batches waiting, the oldest goes out without waiting its linger; past
# twice as many, add() writes the mark itself.
MAX_PENDING_BATCHES = 128


class PublishedMarks:
    def __init__(self, documents: DocumentRepository, linger: float = 2.0,
                 batch: int = BATCH) -> None:
        self.documents = documents
        self.linger = linger
        self.batch = batch
        self._pending: deque[tuple[float, Mark]] = deque()  # (when added, mark), oldest first
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, doc_id: str, event_id: str) -> None:
        """Record that the broker confirmed ``event_id``; written after ``linger`` seconds."""
        if self.linger <= 0:
            self._write([(doc_id, event_id)])
            return
        with self._cond:
            if self._closed or len(self._pending) >= 2 * self.batch * MAX_PENDING_BATCHES:
                write_now = True
            else:
                write_now = False
                self._pending.append((time.monotonic(), (doc_id, event_id)))
                if self._thread is None:
                    # Started on first use: an idle process (or one that never publishes)
                    # keeps no thread. Services are built in each gunicorn worker, after
                    # the fork, so no process inherits another's writer.
                    self._thread = threading.Thread(target=self._run, name="outbox-marks",
                                                    daemon=True)
                    self._thread.start()
                if (len(self._pending) == 1
                        or len(self._pending) >= self.batch * MAX_PENDING_BATCHES):
                    self._cond.notify()
        if write_now:
            self._write([(doc_id, event_id)])

    def flush(self) -> None:
        """Write every pending mark now, in the caller's thread."""
        with self._cond:
            taken = [mark for _, mark in self._pending]
            self._pending.clear()
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
                while not self._closed:
                    if len(self._pending) >= self.batch * MAX_PENDING_BATCHES:
                        break
                    if self._pending:
                        left = self._pending[0][0] + self.linger - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                if self._closed:
                    return  # close() writes what is left
                taken = [self._pending.popleft()[1]
                         for _ in range(min(self.batch, len(self._pending)))]
            self._write(taken)

    def _write(self, marks: list[Mark]) -> None:
        try:
            written = self.documents.published_many(marks)
        except Exception as exc:
            # The events stay in their outboxes, due: the relay sends them again later.
            log.warning("could not record %d confirmed event(s) (%s); the outbox relay will "
                        "publish them again after the grace period", len(marks), exc)
            return
        OUTBOX_MARKS.labels("written").inc(written)
        OUTBOX_MARKS.labels("moot").inc(len(marks) - written)
