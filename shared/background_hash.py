"""SHA-256 of a large upload computed on a second core while the first encrypts and writes.

hashlib releases the interpreter lock for large updates, so a thread of its own hashes in
parallel with the upload's thread (socket reads, AES-GCM, file writes). Small bodies never
start the thread: the first ``threshold`` bytes are hashed inline, where a thread would cost
more than it saves.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

DEFAULT_THRESHOLD = 4 * 1024 * 1024
# Pieces waiting for the hasher (the upload reads 256 KiB at a time): memory stays bounded
# and the upload waits when hashing falls behind.
QUEUE_PIECES = 8


def _immutable(data: ReadableBuffer) -> bytes:
    """The bytes to hash later: the caller may reuse or release its buffer once ``update``
    returns, so anything but a whole ``bytes`` object (or a view of one) is copied."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) \
            and data.nbytes == len(data.obj) and data.contiguous:
        return data.obj  # the upload's case: a view of what the socket read
    return bytes(data)


class BackgroundSha256:
    """``update`` and ``hexdigest`` like hashlib's; ``close`` when the upload is abandoned."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD) -> None:
        self._hash = hashlib.sha256()
        self._threshold = threshold
        self._inline = 0
        self._pieces: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._digest: str | None = None

    @property
    def in_background(self) -> bool:
        return self._thread is not None

    def update(self, data: ReadableBuffer) -> None:
        if self._digest is not None:
            raise ValueError("update after hexdigest")
        if self._pieces is None:
            with memoryview(data) as view:
                self._inline += view.nbytes
            self._hash.update(data)
            if self._inline >= self._threshold:
                self._start()
            return
        self._pieces.put(_immutable(data))

    def _start(self) -> None:
        self._pieces = queue.Queue(QUEUE_PIECES)
        # A daemon: an upload abandoned without close() must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="upload-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._pieces is not None
        while (piece := self._pieces.get()) is not None:
            self._hash.update(piece)

    def _stop(self) -> None:
        if self._pieces is not None and self._thread is not None:
            self._pieces.put(None)
            self._thread.join()
            self._pieces = None

    def hexdigest(self) -> str:
        if self._digest is None:
            self._stop()
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        """Stop the hashing thread, if any (the result is no longer wanted)."""
        self._stop()
