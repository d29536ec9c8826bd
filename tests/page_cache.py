"""How much of a file this node's page cache holds, through mincore(2)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int


def resident_pages(path: Path) -> int:
    """The pages of ``path`` in the page cache. The private mapping touches none of them."""
    size = path.stat().st_size
    if size == 0:
        return 0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        view = ctypes.c_char.from_buffer(mapped)
        try:
            vector = ctypes.create_string_buffer(pages)
            if _libc.mincore(ctypes.addressof(view), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(byte & 1 for byte in vector.raw)
        finally:
            del view  # the mapping cannot close while a ctypes object points into it


def cache_can_drop(path: Path) -> bool:
    """Whether the filesystem holding ``path`` lets its pages go (tmpfs keeps them: they are
    the file)."""
    best, fstype = "", ""
    resolved = path.resolve()
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, kind = line.split()[1:3]
        # By path components: "/tmpdata" is not under a mount at "/tmp".
        if resolved.is_relative_to(mount) and len(mount) >= len(best):
            best, fstype = mount, kind
    return fstype not in ("tmpfs", "ramfs") and hasattr(os, "posix_fadvise")
