"""Encrypted objects on the shared filesystem (EFS in production, a local directory otherwise).

Layout under the root: ``staging/<aa>/<bb>/<id>`` holds claim-check objects written by the
upload function; ``objects/<aa>/<bb>/<id>`` holds stored documents. Paths derive from generated
document ids only (a client's file name never becomes a path). Writes go to a temporary file in
the target directory, are fsynced and renamed into place, so a reader sees a whole object or
none; the directory is fsynced too so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import secrets
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from shared.ids import is_document_id

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


# Written data is handed to the disk in pieces of this size while the upload goes on.
WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range, do not wait


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(2), which Python's os module does not offer; None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        # A failure only means the final fsync does all the work, as it would anyway.
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start


_start_writeback = _writeback_starter()


class _EarlyWriteback(io.FileIO):
    """Starts the disk writing every WRITEBACK_BYTES, so the fsync that ends a large object
    waits for the last few MiB instead of all of it (on EFS: instead of sending it all)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "wb")
        self._handed = 0  # bytes whose writeback has been started
        self._written = 0

    def write(self, data: ReadableBuffer) -> int:
        count = super().write(data)
        self._written += count
        if _start_writeback is not None and self._written - self._handed >= WRITEBACK_BYTES:
            _start_writeback(self.fileno(), self._handed, self._written - self._handed)
            self._handed = self._written
        return count


class Area(StrEnum):
    STAGING = "staging"
    OBJECTS = "objects"


class BlobStore:
    """Objects by area and document id. Paths are strings inside (a pathlib join per call
    was a tenth of the storage function's CPU under load), and a directory is made only when
    an operation finds it missing, not tried before every write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._areas = {area: os.path.join(root, area.value) for area in Area}
        for directory in self._areas.values():
            os.makedirs(directory, mode=0o700, exist_ok=True)

    def path(self, area: Area, doc_id: str) -> Path:
        return Path(self._where(area, doc_id))

    def _where(self, area: Area, doc_id: str) -> str:
        if not is_document_id(doc_id):
            raise ValueError(f"not a generated document id: {doc_id!r}")
        return f"{self._areas[area]}/{doc_id[:2]}/{doc_id[2:4]}/{doc_id}"

    @contextlib.contextmanager
    def writer(self, area: Area, doc_id: str) -> Iterator[BinaryIO]:
        """Yield a file to write; it appears at its final path only if the block succeeds."""
        final = self._where(area, doc_id)
        directory = os.path.dirname(final)
        tmp = f"{directory}/.{doc_id}.{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            make_dirs(directory)
            fd = os.open(tmp, flags, 0o600)
        try:
            # A 1 MiB buffer turns 64 KiB envelope chunks into fewer, larger writes over NFS.
            with io.BufferedWriter(_EarlyWriteback(fd), buffer_size=1024 * 1024) as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
            fsync_dir(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def open(self, area: Area, doc_id: str) -> BinaryIO:
        return open(self._where(area, doc_id), "rb")

    def exists(self, area: Area, doc_id: str) -> bool:
        return os.path.isfile(self._where(area, doc_id))

    def size(self, area: Area, doc_id: str) -> int:
        return os.stat(self._where(area, doc_id)).st_size

    def promote(self, doc_id: str) -> None:
        """Move a staged object to the stored area; repeating it after success is a no-op."""
        src, dst = self._where(Area.STAGING, doc_id), self._where(Area.OBJECTS, doc_id)
        directory = os.path.dirname(dst)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            if os.path.isfile(dst):
                return
            if not os.path.isfile(src):
                raise
            make_dirs(directory)  # the first in its directory
            os.replace(src, dst)
        fsync_dir(directory)

    def delete(self, area: Area, doc_id: str) -> bool:
        try:
            os.unlink(self._where(area, doc_id))
        except FileNotFoundError:
            return False
        return True


def release_pages(f: BinaryIO) -> None:
    """Drop an open object's pages from this node's page cache; the object stays as it is.

    Storage calls it as it finishes reading a new object for the last time, on the handle
    it read with (on EFS another open would be another round trip to the server). Left
    cached, every stored object would sit in the page cache (charged to the pod's memory
    cgroup) until the kernel reclaims it to make room for the next upload's writes;
    dropped, its pages are free for those writes at once. On the development VM, which
    hands free memory back to its host, that made writing a 200 MiB object cost 0.17-0.19 s
    of CPU instead of 0.54-0.70 s (bench/README.md, Findings 28). A download reads the
    object from the filesystem again (on EFS: from the server), hours later anyway.
    """
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def make_dirs(directory: str) -> None:
    """``os.makedirs``, with each directory it makes recorded durably in its parent: the
    fsync of the object's own directory does not cover the entries above it, and a crash
    could otherwise take a new prefix directory, and the accepted object in it, away."""
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        make_dirs(parent)
    # Made by another writer just now is no proof it is recorded yet: fsync either way.
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    fsync_dir(parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or creation in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
