"""Unique PDF documents of an exact size, made on the fly (tests/samples.py's PDF maker).

Every document carries its own marker, so no two uploads have the same bytes (the server
answers a repeated upload from the same user with the existing document instead of storing
it again). Large ones are produced piece by piece and never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

from tests import samples

MARK_WIDTH = 48


def mark(run_id: str, label: str, index: int) -> bytes:
    """A fixed-width marker, so every document of one size has the same length."""
    text = f"BENCH-{run_id}-{label}-{index:08d}"
    return text.encode().ljust(MARK_WIDTH, b"_")[:MARK_WIDTH]


@lru_cache(maxsize=16)
def padding_for(size: int) -> int:
    """The padding that makes a one-page PDF with a MARK_WIDTH marker exactly ``size`` bytes
    (or as close as the format allows)."""
    probe = b"x" * MARK_WIDTH
    padding = max(size - samples.pdf_size(probe), 0)
    for _ in range(8):  # digits of lengths and offsets shift a little with the padding
        actual = samples.pdf_size(probe, padding=padding)
        if actual == size or padding == 0:
            break
        padding = max(padding - (actual - size), 0)
    return padding


def document_size(size: int) -> int:
    return samples.pdf_size(b"x" * MARK_WIDTH, padding=padding_for(size))


def parts(marker: bytes, size: int, piece: int = 1024 * 1024) -> Iterator[bytes]:
    return samples.pdf_parts(marker, padding=padding_for(size), piece=piece)


def whole(marker: bytes, size: int) -> bytes:
    return b"".join(parts(marker, size))
