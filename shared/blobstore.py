"""Encrypted objects on the shared filesystem (EFS in production, a local directory otherwise).

Layout under the root: ``staging/<aa>/<bb>/<id>`` holds claim-check objects written by the
upload function; ``objects/<aa>/<bb>/<id>`` holds stored documents. Paths derive from generated
document ids only (a client's file name never becomes a path). Writes go to a temporary file in
the target directory, are fsynced and renamed into place, so a reader sees a whole object or
none; the directory is fsynced too so the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from shared.ids import is_document_id


class Area(StrEnum):
    STAGING = "staging"
    OBJECTS = "objects"


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for area in Area:
            (root / area.value).mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, area: Area, doc_id: str) -> Path:
        if not is_document_id(doc_id):
            raise ValueError(f"not a generated document id: {doc_id!r}")
        return self.root / area.value / doc_id[:2] / doc_id[2:4] / doc_id

    @contextlib.contextmanager
    def writer(self, area: Area, doc_id: str) -> Iterator[BinaryIO]:
        """Yield a file to write; it appears at its final path only if the block succeeds."""
        final = self.path(area, doc_id)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = final.with_name(f".{doc_id}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # A 1 MiB buffer turns 64 KiB envelope chunks into fewer, larger writes over NFS.
            with os.fdopen(fd, "wb", buffering=1024 * 1024) as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def open(self, area: Area, doc_id: str) -> BinaryIO:
        return self.path(area, doc_id).open("rb")

    def exists(self, area: Area, doc_id: str) -> bool:
        return self.path(area, doc_id).is_file()

    def size(self, area: Area, doc_id: str) -> int:
        return self.path(area, doc_id).stat().st_size

    def promote(self, doc_id: str) -> None:
        """Move a staged object to the stored area; repeating it after success is a no-op."""
        src, dst = self.path(Area.STAGING, doc_id), self.path(Area.OBJECTS, doc_id)
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            if dst.is_file():
                return
            raise
        fsync_dir(dst.parent)

    def delete(self, area: Area, doc_id: str) -> bool:
        try:
            self.path(area, doc_id).unlink()
        except FileNotFoundError:
            return False
        return True


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
