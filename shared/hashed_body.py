"""An upload's body received piece by piece, each piece hashed (SHA-256) as it lands.

The upload encrypts and writes each piece after this hands it over. For a large body, while
this process has a core to spare (``shared.large_uploads``), a thread of its own
receives ahead into a ring of buffers and hashes each piece the moment it arrives, while the
request's thread encrypts and writes the pieces before it. The hash is the slower pass over
the data, and it runs fastest over data just received on the same core (about 1.7 GB/s here
against 1.1 GB/s over data from another core); AES-GCM is fast either way. Otherwise (a
small body, or every core busy with an upload of its own) the request's thread receives,
hashes and hands over each piece itself, through one reused buffer (bench/README.md,
Finding 36).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Generator
from typing import Final

from shared import large_uploads as _large
from shared.background_hash import DEFAULT_THRESHOLD
from shared.large_uploads import LargeUploads
from shared.request_body import BodyReader

INLINE_PIECE: Final = 256 * 1024
AHEAD_PIECE: Final = 1024 * 1024
# Buffers of the ring: what the receiving thread may be ahead of the writing one, and the
# upload's memory on top of the inline buffer (4 MiB).
AHEAD_PIECES: Final = 4


class _Signal:
    """A marker on the queue from the receiving thread."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_END: Final = _Signal("end of body")  # nothing more to receive
_HANDOVER: Final = _Signal("handover")  # no core to spare any more: receive inline


class HashedBody:
    """``pieces()`` yields the body as views, each valid until the next one is asked for;
    ``sha256_hex()`` once they are all through; ``received`` counts the bytes."""

    def __init__(self, body: BodyReader, length: int | None, *,
                 threshold: int = DEFAULT_THRESHOLD, uploads: LargeUploads | None = None) -> None:
        self._body = body
        self._length = length
        self._threshold = threshold
        self._uploads = uploads or _large.LARGE_UPLOADS
        self._hash = hashlib.sha256()
        self._counted = False  # past the threshold, and so counted in ``uploads``
        self._ended = False
        self._ring: list[bytearray] = []
        self.received = 0
        self.pieces_ahead = 0  # pieces the receiving thread received (the tests look)

    def sha256_hex(self) -> str:
        if not self._ended:
            raise ValueError("the body has not been received to its end")
        return self._hash.hexdigest()

    def pieces(self) -> Generator[memoryview, None, None]:
        """The body's pieces; closing the iterator early stops receiving (and joins the
        receiving thread, so nobody reads the connection once the request is answered)."""
        size = INLINE_PIECE if not self._length else min(INLINE_PIECE, self._length)
        buffer = memoryview(bytearray(size))
        try:
            while not self._ended:
                if self._counted and self._uploads.core_to_spare():
                    yield from self._ahead()
                    continue
                count = self._body.readinto(buffer)
                if not count:
                    self._ended = True
                    return
                piece = buffer[:count]
                self._hash.update(piece)
                self._count(count)
                yield piece
        finally:
            if self._counted:
                self._counted = False
                self._uploads.leave()

    def _count(self, count: int) -> None:
        self.received += count
        if not self._counted and self.received >= self._threshold:
            self._counted = True
            self._uploads.enter()

    def _ahead(self) -> Generator[memoryview, None, None]:
        """Pieces from the receiving thread, until the body ends or the core is wanted."""
        if not self._ring:
            self._ring = [bytearray(AHEAD_PIECE) for _ in range(AHEAD_PIECES)]
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for ring_buffer in self._ring:
            free.put(ring_buffer)
        full: queue.SimpleQueue[tuple[bytearray, int] | _Signal | BaseException] = \
            queue.SimpleQueue()
        stop = threading.Event()
        thread = threading.Thread(target=self._receive, args=(free, full, stop),
                                  name="upload-receive", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = full.get()
                if isinstance(item, _Signal):
                    finished = True
                    self._ended = item is _END
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                ring_buffer, count = item
                yield memoryview(ring_buffer)[:count]
                free.put(ring_buffer)
        finally:
            if not finished:  # the consumer gave up: stop the thread where it is
                stop.set()
                while not isinstance(item := full.get(), (_Signal, BaseException)):
                    free.put(item[0])
            thread.join()

    def _receive(self, free: queue.SimpleQueue[bytearray],
                 full: queue.SimpleQueue[tuple[bytearray, int] | _Signal | BaseException],
                 stop: threading.Event) -> None:
        try:
            while not stop.is_set() and self._uploads.core_to_spare():
                ring_buffer = free.get()
                if stop.is_set():  # it waited for this buffer while the request gave up
                    break
                view = memoryview(ring_buffer)
                count = 0
                while count < len(view):
                    got = self._body.readinto(view[count:])
                    if not got:
                        break
                    count += got
                if count:
                    self._hash.update(view[:count])
                    self.received += count
                    self.pieces_ahead += 1
                    full.put((ring_buffer, count))
                if count < len(view):
                    full.put(_END)
                    return
            full.put(_HANDOVER)
        except BaseException as exc:  # handed to the request's thread, which raises it
            full.put(exc)
