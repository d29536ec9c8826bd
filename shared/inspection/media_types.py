"""Media types: sniffed from a document's first bytes, and normalised from what clients send."""

from __future__ import annotations

from typing import Final

import filetype

SNIFF_BYTES = 8192
# Aliases clients send for the canonical types of the allow-list.
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
            "application/x-pdf": "application/pdf", "image/heif": "image/heic"}
# The types this package knows how to inspect; sniff() must never mistake an archive for one.
DOCUMENT_TYPES: Final = frozenset(
    {"application/pdf", "image/jpeg", "image/png", "image/tiff", "image/heic"})
# Local file header, end of central directory (empty archive), spanned-archive marker.
_ZIP_SIGNATURES: Final = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


def normalize_media_type(value: str) -> str:
    base = value.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff(head: bytes) -> str | None:
    kind = filetype.guess(head)
    media_type = None if kind is None else normalize_media_type(str(kind.mime))
    # An archive must never pass for an accepted type, whatever filetype's matchers make of
    # it; more specific answers (an OOXML document, an EPUB) are kept for the reason shown.
    if head.startswith(_ZIP_SIGNATURES) and (media_type is None or media_type in DOCUMENT_TYPES):
        return "application/zip"
    return media_type
