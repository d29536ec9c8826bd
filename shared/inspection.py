"""What a document really is: media type sniffed from its bytes, and basic metadata.

Parsers read through a seekable, decrypting view of the stored object, so even a large
document is inspected without its plaintext ever being written anywhere.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, BinaryIO

import filetype
from PIL import Image
from pypdf import PdfReader
from pypdf.errors import PdfReadError

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
# Aliases clients send for the canonical types of the allow-list.
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
            "application/x-pdf": "application/pdf", "image/heif": "image/heic"}
# A delivery photo or scan has no business above this many pixels; beyond it decoding could
# be used to exhaust memory (a decompression bomb).
MAX_IMAGE_PIXELS = 120_000_000


class InvalidDocument(Exception):
    """The bytes are not a usable document of their type; the message is the reason shown."""


def normalize_media_type(value: str) -> str:
    base = value.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff(head: bytes) -> str | None:
    kind = filetype.guess(head)
    if kind is None:
        return None
    return normalize_media_type(str(kind.mime))


def extract_metadata(media_type: str, stream: BinaryIO) -> dict[str, Any]:
    if media_type == "application/pdf":
        return _pdf_metadata(stream)
    if media_type in ("image/jpeg", "image/png", "image/tiff"):
        return _image_metadata(stream)
    return {}


def _pdf_metadata(stream: BinaryIO) -> dict[str, Any]:
    try:
        reader = PdfReader(stream, strict=False)
        if reader.is_encrypted:
            return {"encrypted": True}
        return {"pages": len(reader.pages)}
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidDocument(f"corrupt PDF: {exc}") from exc


def _image_metadata(stream: BinaryIO) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidDocument(f"image too large: {width}x{height} pixels")
                # verify() walks the data (CRCs, markers) without decoding pixels into memory
                img.verify()
                return {"width": width, "height": height, "format": img.format}
    except InvalidDocument:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidDocument(f"corrupt image: {exc}") from exc
