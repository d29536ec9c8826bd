"""What a document really is: media type sniffed from its bytes, and basic metadata.

Parsers read through a seekable, decrypting view of the stored object, so even a large
document is inspected without its plaintext ever being written anywhere.

Uploads are hostile until proven otherwise, so besides extracting metadata the inspection
rejects documents that could hurt whoever opens them later or the inspection itself:

* decompression bombs: images whose declared size is beyond ``MAX_IMAGE_PIXELS`` (checked
  from the headers; pixels are never decoded) and PDFs whose compressed structures inflate
  beyond a small budget (content streams are never decoded at all);
* polyglots: files that are also a PDF (a ``%PDF-`` header in the first 1024 bytes, which
  is where PDF readers look for it) or a ZIP archive (an end-of-central-directory record in
  the last 64 KiB, which is where ZIP readers look for it), and images carrying data after
  their end marker;
* PDFs with active content: JavaScript, launch actions, embedded files, rich media and XFA
  forms, found by walking the document structure with pypdf.

Images are walked structurally (PNG chunks with their CRCs, JPEG segments and scans, HEIC
boxes) in blocks of at most ``_BLOCK`` bytes, and the polyglot checks read only the first
1024 bytes and the last 64 KiB, so memory stays flat however large the file. For PDFs,
pypdf keeps the page list in memory, which a page-tree limit caps at a few tens of MB.
What pypdf and Pillow's TIFF reader need still grows with the file, so a PDF or TIFF over
1 MiB is inspected by another process with a memory budget and a deadline (``isolated``).

Decisions worth knowing:

* A PDF that opens without a password (only an owner password, restricting printing or
  editing) is inspected like any other and reported with ``"encrypted": True``; one that
  needs a password cannot be inspected and is rejected.
* Data after an image's end is tolerated only when tiny, pure padding, further complete
  JPEGs (MPF gain or depth maps) or a small Samsung metadata trailer. Motion photos, which
  append a video to the JPEG, are therefore rejected.
* Images up to ``MAX_IMAGE_PIXELS`` are accepted even where Pillow would warn (89 Mpx).

Modules: ``media_types`` (sniffing and normalising media types), ``extract`` (the entry
point, ``extract_metadata``), ``polyglot`` (the checks common to all types), ``images``,
``pdf`` (the pypdf limits and the active-content walk), ``isolated`` (the inspector processes),
``streams`` (positioned reads) and ``errors`` (``InvalidDocument``).
"""

from __future__ import annotations

from shared.inspection.errors import InvalidDocument
from shared.inspection.extract import extract_metadata
from shared.inspection.images import MAX_IMAGE_PIXELS, MAX_TIFF_PAGES
from shared.inspection.media_types import SNIFF_BYTES, normalize_media_type, sniff

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_TIFF_PAGES",
    "SNIFF_BYTES",
    "InvalidDocument",
    "extract_metadata",
    "normalize_media_type",
    "sniff",
]
