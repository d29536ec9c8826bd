"""The entry point of the inspection: what a document of a sniffed type is, or why not."""

from __future__ import annotations

import io
from typing import Any, BinaryIO

from shared.inspection.images import check_image_end, heic_end, image_metadata
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
        # Pillow cannot read HEIC here, so there is no metadata; its box structure is still
        # walked so that nothing hides after it.
        check_image_end(heic_end, stream, size)
        return {}
    return image_metadata(media_type, stream, size)
