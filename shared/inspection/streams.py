"""Reading the stored object: parsers see a seekable (often decrypting) view of it."""

from __future__ import annotations

from typing import BinaryIO


def read_at(stream: BinaryIO, offset: int, length: int) -> bytes:
    stream.seek(offset)
    parts: list[bytes] = []
    while length > 0:
        part = stream.read(length)
        if not part:
            break
        parts.append(part)
        length -= len(part)
    return b"".join(parts)
