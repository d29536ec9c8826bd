"""Checks common to all types: rejecting files that other readers take for a PDF or a ZIP
archive (polyglots), by looking only where those readers look."""

from __future__ import annotations

import struct
from typing import BinaryIO, Final

from shared.inspection.errors import InvalidDocument
from shared.inspection.streams import read_at

# Reasons shown to users.
_POLYGLOT: Final = "file is valid as more than one type (polyglot)"

# PDF readers accept the header anywhere in the first 1024 bytes (Acrobat's rule).
_PDF_HEADER_WINDOW: Final = 1024
# ZIP readers look for the end-of-central-directory record (22 bytes) followed by a comment
# of at most 65535 bytes, so this much of the tail is all a ZIP polyglot can hide in.
_ZIP_TAIL: Final = 22 + 0xFFFF


def reject_polyglots(media_type: str, stream: BinaryIO, size: int) -> None:
    # Only the regions other readers look at are read: the head and the tail.
    if media_type != "application/pdf" and b"%PDF-" in read_at(stream, 0, _PDF_HEADER_WINDOW):
        raise InvalidDocument(_POLYGLOT)
    if _has_zip_directory(stream, size):
        raise InvalidDocument(_POLYGLOT)


def _has_zip_directory(stream: BinaryIO, size: int) -> bool:
    """Whether a ZIP reader would find an archive: an end-of-central-directory record in the
    tail whose central directory really is where the record says."""
    start = max(0, size - _ZIP_TAIL)
    tail = read_at(stream, start, size - start)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0:
        if _is_zip_end_record(stream, tail[at : at + 22], start + at):
            return True
        at = tail.rfind(b"PK\x05\x06", 0, at)
    return False


def _is_zip_end_record(stream: BinaryIO, record: bytes, offset: int) -> bool:
    # Four bytes of compressed data can look like the signature by chance; a real record
    # also points at a central directory, which starts with its own signature.
    if len(record) < 22:
        return False
    # signature, this disk, directory disk (8 bytes), entries here, entries in total, size
    # and offset of the central directory, comment length
    entries, directory_size, directory_offset = struct.unpack_from("<8x2xHII", record)
    if entries == 0xFFFF or 0xFFFFFFFF in (directory_size, directory_offset):
        # ZIP64: the real values are in a ZIP64 record announced by a locator just before.
        return offset >= 20 and read_at(stream, offset - 20, 4) == b"PK\x06\x07"
    if entries == 0:
        return False  # an empty archive carries nothing
    # Readers accept the directory where the record says, or (with data prepended to the
    # archive, as in a polyglot) right before the record.
    candidates = {directory_offset, offset - directory_size}
    return any(0 <= where < offset and read_at(stream, where, 4) == b"PK\x01\x02"
               for where in candidates)
