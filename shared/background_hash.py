"""SHA-256 of a large upload, computed on a second core while one is free.

hashlib releases the interpreter lock for large updates, so a thread of its own can hash in
parallel with the upload's thread (socket reads, AES-GCM, file writes): one upload alone then
finishes sooner. That costs CPU, though: the hashing thread reads every piece from the other
core's cache, where SHA-256 is slower (``shared.hashed_body`` gives the figures), and the
pieces queue between threads. So an upload hashes on a thread only while this process has
fewer large uploads in flight than it has cores (``shared.large_uploads``); when a second
one arrives on two cores, both hash inline, while each piece is still in its core's cache,
and get more done (bench/README.md, Finding 36). Small bodies never start the thread: the
first ``threshold`` bytes are hashed inline, where a thread would cost more than it saves.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import TYPE_CHECKING

from shared import large_uploads as _large
from shared.large_uploads import LargeUploads

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
    """``update`` and ``hexdigest`` like hashlib's; ``close`` when the upload is abandoned.

    While ``in_background`` is True, pieces are queued rather than hashed before ``update``
    returns: a whole ``bytes`` object goes as it is, anything else is copied. A caller that
    reuses one buffer for every piece can do so without copies while it is False. Past the
    threshold, each piece is placed anew: the thread starts when a core is to spare and
    stops (after hashing what it holds) when there is none.
    """

    def __init__(self, threshold: int = DEFAULT_THRESHOLD,
                 large_uploads: LargeUploads | None = None) -> None:
        self._hash = hashlib.sha256()
        self._threshold = threshold
        self._large_uploads = large_uploads or _large.LARGE_UPLOADS  # looked up now: tests swap it
        self._counted = False  # past the threshold, and so counted in ``large_uploads``
        self._inline = 0
        self._pieces: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._digest: str | None = None
        self._closed = False

    @property
    def in_background(self) -> bool:
        return self._thread is not None

    def update(self, data: ReadableBuffer) -> None:
        if self._digest is not None:
            raise ValueError("update after hexdigest")
        if self._closed:
            raise ValueError("update after close")
        if not self._counted:
            self._hash.update(data)
            with memoryview(data) as view:
                self._inline += view.nbytes
            if self._inline >= self._threshold:
                self._counted = True
                self._large_uploads.enter()
                if self._large_uploads.core_to_spare():
                    self._start()
            return
        if self._large_uploads.core_to_spare() != self.in_background:
            if self.in_background:
                self._stop_thread()
            else:
                self._start()
        if self._pieces is None:
            self._hash.update(data)
        else:
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

    def _stop_thread(self) -> None:
        """Let the thread hash what it holds and end; later pieces are hashed inline."""
        if self._pieces is not None and self._thread is not None:
            self._pieces.put(None)
            self._thread.join()
        self._pieces = None
        self._thread = None

    def _stop(self) -> None:
        self._stop_thread()
        if self._counted:
            self._counted = False
            self._large_uploads.leave()

    def hexdigest(self) -> str:
        if self._digest is None:
            self._stop()
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        """Stop the hashing thread, if any (the result is no longer wanted)."""
        self._closed = True
        self._stop()
