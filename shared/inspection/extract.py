"""The entry point of the inspection: what a document of a sniffed type is, or why not."""

from __future__ import annotations

import io
from typing import Any, BinaryIO

from shared.inspection.images import heic_metadata, image_metadata
from shared.inspection.media_types import DOCUMENT_TYPES
from shared.inspection.pdf import pdf_metadata
from shared.inspection.polyglot import reject_polyglots


def extract_metadata(media_type: str, stream: BinaryIO) -> dict[str, Any]:
    if media_type not in DOCUMENT_TYPES:
        return {}
    size = stream.seek(0, io.SEEK_END)
    reject_polyglots(media_type, stream, size)
    if media_type == "application/pdf":
        return pdf_metadata(stream)
    if media_type == "image/heic":
        # Pillow cannot read HEIC here: its boxes are walked, so that nothing hides after
        # them and what it declares is held to the same limits as the other images.
        return heic_metadata(stream, size)
    return image_metadata(media_type, stream, size)
