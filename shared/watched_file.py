"""A small file's parsed content, read again only when the file has changed.

Looked at on every request (the active key pointer, the link keyring), such a file costs a
`stat` instead of the six system calls of opening and reading it, each of which lets go of
the interpreter lock and, in a busy process, waits to take it back (bench/README.md,
Finding 42).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

T = TypeVar("T")

# Coarser than any file system's timestamps: a file written more recently than this is
# never trusted by its stamp (as git treats "racily clean" files).
SETTLED_NS: Final = 2_000_000_000


class WatchedFile(Generic[T]):
    """``current()`` is the file's content as ``parse`` makes it, or None while there is
    no file; the file is read again when its inode, mtime or size differ from the one read
    last (a rename over it brings a new inode, an edit in place a new mtime)."""

    def __init__(self, path: str | os.PathLike[str], parse: Callable[[bytes], T],
                 max_bytes: int) -> None:
        self.path = os.fspath(path)
        self._parse = parse
        self._max_bytes = max_bytes
        # One tuple, replaced whole: threads read it without a lock.
        self._known: tuple[tuple[int, int, int], T] | None = None

    def current(self) -> T | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = self._known
        if known is not None and known[0] == stamp:
            return known[1]
        try:
            with open(self.path, "rb") as f:
                value = self._parse(f.read(self._max_bytes))
        except FileNotFoundError:
            return None
        # Replaced between the stat and the read? Then the stamp is the old file's, and the
        # next use reads again. A file written moments ago is not trusted by its stamp at
        # all: another write within the same tick of the file system's clock, into a reused
        # inode, could leave every field the same.
        settled = time.time_ns() - st.st_mtime_ns > SETTLED_NS
        self._known = (stamp, value) if settled else None
        return value
