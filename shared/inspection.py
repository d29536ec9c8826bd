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

Decisions worth knowing:

* A PDF that opens without a password (only an owner password, restricting printing or
  editing) is inspected like any other and reported with ``"encrypted": True``; one that
  needs a password cannot be inspected and is rejected.
* Data after an image's end is tolerated only when tiny, pure padding, further complete
  JPEGs (MPF gain or depth maps) or a small Samsung metadata trailer. Motion photos, which
  append a video to the JPEG, are therefore rejected.
* Images up to ``MAX_IMAGE_PIXELS`` are accepted even where Pillow would warn (89 Mpx).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Final

import filetype
from PIL import Image
from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, LimitReachedError, PyPdfError
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
# Aliases clients send for the canonical types of the allow-list.
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
            "application/x-pdf": "application/pdf", "image/heif": "image/heic"}
# A delivery photo or scan has no business above this many pixels; beyond it decoding could
# be used to exhaust memory (a decompression bomb).
MAX_IMAGE_PIXELS = 120_000_000

# The types this module knows how to inspect; sniff() must never mistake an archive for one.
_DOCUMENT_TYPES: Final = frozenset(
    {"application/pdf", "image/jpeg", "image/png", "image/tiff", "image/heic"})
# Local file header, end of central directory (empty archive), spanned-archive marker.
_ZIP_SIGNATURES: Final = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")

# Reasons shown to users. The "corrupt PDF" / "corrupt image" prefixes predate this module's
# hardening and are matched by clients and tests, so they are kept.
_POLYGLOT: Final = "file is valid as more than one type (polyglot)"
_TRAILING: Final = "unexpected data after the end of the image"
_METADATA_TOO_LARGE: Final = "image metadata is too large"
_PDF_JAVASCRIPT: Final = "PDF contains JavaScript"
_PDF_LAUNCH: Final = "PDF launches external programs"
_PDF_EMBEDDED: Final = "PDF has embedded files"
_PDF_XFA: Final = "PDF contains an XFA form"
_PDF_RICH_MEDIA: Final = "PDF contains rich media (Flash, video or 3D)"
_PDF_ENCRYPTED: Final = "encrypted PDF cannot be inspected"
_PDF_TOO_COMPLEX: Final = "PDF is too complex to inspect"
_PDF_UNSUPPORTED: Final = "PDF uses a feature that cannot be inspected"

# Unit of every sequential read: large enough to be fast, small enough to keep memory flat.
_BLOCK: Final = 1024 * 1024
# PDF readers accept the header anywhere in the first 1024 bytes (Acrobat's rule).
_PDF_HEADER_WINDOW: Final = 1024
# ZIP readers look for the end-of-central-directory record (22 bytes) followed by a comment
# of at most 65535 bytes, so this much of the tail is all a ZIP polyglot can hide in.
_ZIP_TAIL: Final = 22 + 0xFFFF
# Bytes after an image's end marker that are tolerated whatever they are: a stray newline or
# a few bytes of encoder padding. Longer runs are accepted only if they are pure padding.
_TRAILING_TOLERANCE: Final = 256
_PADDING: Final = b"\x00\xff \t\r\n"
# Samsung cameras append a small metadata trailer ending in "SEFT" (capture time and the
# like) to ordinary photos; tolerated when small, so a motion photo's appended video is not.
_SAMSUNG_TRAILER: Final = b"SEFT"
_SAMSUNG_TRAILER_LIMIT: Final = 64 * 1024
# Headers and ancillary chunks that Pillow reads into memory when it opens an image (EXIF,
# ICC profiles, XMP, text); real cameras and scanners stay far below this.
_MAX_METADATA_BYTES: Final = 16 * 1024 * 1024
# What compressed PNG text and ICC chunks may inflate to: Pillow inflates them on open.
_MAX_INFLATED_METADATA: Final = 8 * 1024 * 1024
# Structure counts beyond anything a real file has: they bound the time spent walking.
_MAX_JPEG_SEGMENTS: Final = 10_000
_MAX_JPEG_EXTRA_IMAGES: Final = 8  # MPF secondary images: depth or gain maps, previews
_MAX_PNG_CHUNKS: Final = 200_000
_MAX_HEIC_BOXES: Final = 10_000
MAX_TIFF_PAGES: Final = 1_000
# What pypdf may inflate while reading the structure (cross-reference and object streams;
# content streams are never decoded). Legitimate object streams are well under 1 MiB.
_PDF_MAX_DECODED: Final = 16 * 1024 * 1024
# Objects read while looking for active content; a document needing more is refused
# rather than inspected for an unbounded time.
_PDF_WALK_BUDGET: Final = 200_000
_PDF_WALK_CACHED: Final = 1_000  # of those, how many pypdf may keep cached at a time
# pypdf holds every page of the flattened page tree in memory (2-5 KB each), and a page
# costs a hostile file about 50 bytes: this many entries (pages and intermediate nodes) is
# ample for real documents and keeps that memory in the tens of MB.
_PDF_MAX_PAGE_TREE_ENTRIES: Final = 20_000

# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                              0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})
# Inside entropy-coded data a 0xFF is followed by 0x00 (byte stuffing) or a restart marker;
# anything else is the marker ending the scan.
_JPEG_SCAN_END: Final = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PNG_COMPRESSED_METADATA: Final = frozenset({b"zTXt", b"iTXt", b"iCCP"})
_PIL_FORMATS: Final = {"image/jpeg": "JPEG", "image/png": "PNG", "image/tiff": "TIFF"}


class InvalidDocument(Exception):
    """The bytes are not a usable document of their type; the message is the reason shown."""


class _Malformed(Exception):
    """The structure of an image is broken; becomes "corrupt image: <message>"."""


def normalize_media_type(value: str) -> str:
    base = value.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff(head: bytes) -> str | None:
    kind = filetype.guess(head)
    media_type = None if kind is None else normalize_media_type(str(kind.mime))
    # An archive must never pass for an accepted type, whatever filetype's matchers make of
    # it; more specific answers (an OOXML document, an EPUB) are kept for the reason shown.
    if head.startswith(_ZIP_SIGNATURES) and (media_type is None or media_type in _DOCUMENT_TYPES):
        return "application/zip"
    return media_type


def extract_metadata(media_type: str, stream: BinaryIO) -> dict[str, Any]:
    if media_type not in _DOCUMENT_TYPES:
        return {}
    size = stream.seek(0, io.SEEK_END)
    _reject_polyglots(media_type, stream, size)
    if media_type == "application/pdf":
        return _pdf_metadata(stream)
    if media_type == "image/heic":
        # Pillow cannot read HEIC here, so there is no metadata; its box structure is still
        # walked so that nothing hides after it.
        _check_image_end(_heic_end, stream, size)
        return {}
    return _image_metadata(media_type, stream, size)


# -- checks common to all types ------------------------------------------------------------


def _read_at(stream: BinaryIO, offset: int, length: int) -> bytes:
    stream.seek(offset)
    parts: list[bytes] = []
    while length > 0:
        part = stream.read(length)
        if not part:
            break
        parts.append(part)
        length -= len(part)
    return b"".join(parts)


def _reject_polyglots(media_type: str, stream: BinaryIO, size: int) -> None:
    # Only the regions other readers look at are read: the head and the tail.
    if media_type != "application/pdf" and b"%PDF-" in _read_at(stream, 0, _PDF_HEADER_WINDOW):
        raise InvalidDocument(_POLYGLOT)
    if _has_zip_directory(stream, size):
        raise InvalidDocument(_POLYGLOT)


def _has_zip_directory(stream: BinaryIO, size: int) -> bool:
    """Whether a ZIP reader would find an archive: an end-of-central-directory record in the
    tail whose central directory really is where the record says."""
    start = max(0, size - _ZIP_TAIL)
    tail = _read_at(stream, start, size - start)
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
        return offset >= 20 and _read_at(stream, offset - 20, 4) == b"PK\x06\x07"
    if entries == 0:
        return False  # an empty archive carries nothing
    # Readers accept the directory where the record says, or (with data prepended to the
    # archive, as in a polyglot) right before the record.
    candidates = {directory_offset, offset - directory_size}
    return any(0 <= where < offset and _read_at(stream, where, 4) == b"PK\x01\x02"
               for where in candidates)


# -- images --------------------------------------------------------------------------------


def _image_metadata(media_type: str, stream: BinaryIO, size: int) -> dict[str, Any]:
    if media_type == "image/png":
        _check_image_end(_png_end, stream, size)
    elif media_type == "image/jpeg":
        _check_image_end(_jpeg_file_end, stream, size)
    # TIFF data (strips, tiles, IFDs) may sit anywhere in the file, so there is no end marker
    # to check; the polyglot checks and the per-page size cap below still apply.
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 Mpx on; MAX_IMAGE_PIXELS is our own, deliberate limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            stream.seek(0)
            # Only the declared format's plugin may parse the bytes: no guessing.
            with Image.open(stream, formats=[_PIL_FORMATS[media_type]]) as img:
                # Opening reads headers only; pixels are never decoded here. The structural
                # walk above replaces img.verify(), which for PNG holds each chunk in memory.
                width, height = img.size
                _check_pixels(width, height)
                metadata: dict[str, Any] = {"width": width, "height": height,
                                            "format": img.format}
                if media_type == "image/tiff":
                    metadata["pages"] = _tiff_pages(img)
                return metadata
    except Image.DecompressionBombError as exc:
        # Pillow's own cap (twice its 89 Mpx warning level) lies above ours.
        raise InvalidDocument(f"image too large: more than {MAX_IMAGE_PIXELS} pixels") from exc
    # What Pillow raises on broken headers (KeyError: an unknown TIFF compression or mode).
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
            struct.error, zlib.error) as exc:
        raise InvalidDocument(f"corrupt image: {exc}") from exc


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidDocument(f"image too large: {width}x{height} pixels")


def _tiff_pages(img: Image.Image) -> int:
    # Every page could be decoded by whoever opens the file later, so every page is held to
    # the pixel cap, not only the first one Pillow checks on open. Pillow's n_frames walks
    # the whole IFD chain with no bound, hence the explicit loop.
    pages = 0
    while True:
        _check_pixels(*img.size)
        pages += 1
        if pages > MAX_TIFF_PAGES:
            raise InvalidDocument(f"image has too many pages (more than {MAX_TIFF_PAGES})")
        try:
            img.seek(pages)
        except EOFError:
            return pages


def _check_image_end(find_end: Callable[[BinaryIO, int], int], stream: BinaryIO,
                     size: int) -> None:
    """Run ``find_end(stream, size) -> offset`` and reject what follows that offset."""
    try:
        end = find_end(stream, size)
    except _Malformed as exc:
        raise InvalidDocument(f"corrupt image: {exc}") from exc
    _check_trailing(stream, end, size)


def _check_trailing(stream: BinaryIO, end: int, size: int) -> None:
    extra = size - end
    if extra <= _TRAILING_TOLERANCE:
        return
    if extra <= _SAMSUNG_TRAILER_LIMIT and _read_at(stream, size - 4, 4) == _SAMSUNG_TRAILER:
        return
    # Any amount of padding is harmless; anything else is a payload riding along.
    stream.seek(end)
    while block := stream.read(_BLOCK):
        if block.strip(_PADDING):
            raise InvalidDocument(_TRAILING)


def _jpeg_file_end(stream: BinaryIO, size: int) -> int:
    end = _jpeg_end(stream, 0)
    # Phones store further complete JPEGs after the first (MPF: depth and HDR gain maps,
    # previews); they are walked the same way. Anything else is left to _check_trailing.
    for _ in range(_MAX_JPEG_EXTRA_IMAGES):
        if end >= size or _read_at(stream, end, 3) != b"\xff\xd8\xff":
            break
        try:
            end = _jpeg_end(stream, end)
        except _Malformed as exc:
            raise InvalidDocument(_TRAILING) from exc
    return end


def _jpeg_end(stream: BinaryIO, start: int) -> int:
    """Offset just past the EOI marker of the JPEG starting at ``start``.

    Segments are skipped by their length (so an EXIF thumbnail's own EOI inside APP1 does not
    count) and entropy-coded data is scanned in blocks for the marker that ends it.
    """
    if _read_at(stream, start, 2) != b"\xff\xd8":
        raise _Malformed("JPEG does not start with a start-of-image marker")
    pos = start + 2
    header_bytes = 0
    for _ in range(_MAX_JPEG_SEGMENTS):
        code, pos = _jpeg_marker(stream, pos)
        if code == 0xD9:
            return pos
        if code in _JPEG_STANDALONE:
            continue
        if code == 0xD8:
            raise _Malformed("JPEG has a start-of-image marker inside the image")
        raw = _read_at(stream, pos, 2)
        if len(raw) < 2:
            raise _Malformed("JPEG ends before its end-of-image marker")
        (length,) = struct.unpack(">H", raw)
        if length < 2:
            raise _Malformed(f"JPEG segment {code:#04x} has an invalid length")
        if code in _JPEG_SOF:
            frame = _read_at(stream, pos + 2, 5)
            if len(frame) == 5:
                height, width = struct.unpack_from(">HH", frame, 1)
                _check_pixels(width, height)  # before Pillow ever sees the header
        if code != 0xDA:
            header_bytes += length
            if header_bytes > _MAX_METADATA_BYTES:
                raise InvalidDocument(_METADATA_TOO_LARGE)
        pos += length
        if code == 0xDA:
            pos = _jpeg_scan_end(stream, pos)
    raise _Malformed("JPEG has too many segments")


def _jpeg_marker(stream: BinaryIO, pos: int) -> tuple[int, int]:
    """The marker code at ``pos`` (skipping 0xFF fill bytes) and the offset after it."""
    first = _read_at(stream, pos, 1)
    if not first:
        raise _Malformed("JPEG ends before its end-of-image marker")
    if first != b"\xff":
        raise _Malformed(f"JPEG marker expected at offset {pos}")
    pos += 1
    while block := stream.read(4096):
        code = block.lstrip(b"\xff")
        if code:
            return code[0], pos + len(block) - len(code) + 1
        pos += len(block)
    raise _Malformed("JPEG ends before its end-of-image marker")


def _jpeg_scan_end(stream: BinaryIO, pos: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at ``pos``."""
    stream.seek(pos)
    pending_ff = False  # the previous block ended in 0xFF: its partner is in this block
    while block := stream.read(_BLOCK):
        if pending_ff and block[0] not in (0x00, *range(0xD0, 0xD8)):
            return pos - 1
        found = _JPEG_SCAN_END.search(block)
        if found:
            return pos + found.start()
        pending_ff = block.endswith(b"\xff")
        pos += len(block)
    raise _Malformed("JPEG ends before its end-of-image marker")


def _png_end(stream: BinaryIO, size: int) -> int:
    """Offset just past the IEND chunk, checking each chunk's CRC on the way.

    Chunk data is read in blocks, never whole, so a huge IDAT costs time, not memory, and is
    never inflated. The chunks Pillow reads and inflates when opening (everything before the
    first IDAT) are held to a budget so that opening stays cheap too.
    """
    if _read_at(stream, 0, 8) != _PNG_SIGNATURE:
        raise _Malformed("not a PNG file")
    pos = 8
    metadata_bytes = 0
    inflated = 0
    seen_image_data = False
    for index in range(_MAX_PNG_CHUNKS):
        header = _read_at(stream, pos, 8)
        if len(header) < 8:
            raise _Malformed("PNG ends before its IEND chunk")
        length: int
        kind: bytes
        length, kind = struct.unpack(">I4s", header)
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise _Malformed(f"PNG chunk at offset {pos} is invalid")
        if (index == 0) != (kind == b"IHDR"):
            raise _Malformed("PNG does not start with an IHDR chunk")
        if pos + 12 + length > size:
            raise _Malformed(f"PNG chunk {kind.decode()} is truncated")
        seen_image_data = seen_image_data or kind == b"IDAT"
        if not seen_image_data:
            metadata_bytes += length
            if metadata_bytes > _MAX_METADATA_BYTES:
                raise InvalidDocument(_METADATA_TOO_LARGE)
        crc = zlib.crc32(kind)
        if kind == b"IHDR" or (not seen_image_data and kind in _PNG_COMPRESSED_METADATA):
            # Small (bounded by _MAX_METADATA_BYTES above) and needed whole.
            data = stream.read(length)
            crc = zlib.crc32(data, crc)
            if kind == b"IHDR":
                if length < 8:
                    raise _Malformed("PNG IHDR chunk is too short")
                _check_pixels(*struct.unpack_from(">II", data))
            else:
                inflated += _inflated_size(_compressed_part(kind, data),
                                           _MAX_INFLATED_METADATA - inflated)
                if inflated > _MAX_INFLATED_METADATA:
                    raise InvalidDocument(_METADATA_TOO_LARGE)
        else:
            left = length
            while left:
                block = stream.read(min(left, _BLOCK))
                if not block:
                    raise _Malformed(f"PNG chunk {kind.decode()} is truncated")
                crc = zlib.crc32(block, crc)
                left -= len(block)
        stored = stream.read(4)
        if len(stored) < 4 or struct.unpack(">I", stored)[0] != crc:
            raise _Malformed(f"PNG chunk {kind.decode()} fails its CRC check")
        pos += 12 + length
        if kind == b"IEND":
            return pos
    raise _Malformed("PNG has too many chunks")


def _compressed_part(kind: bytes, data: bytes) -> bytes:
    """The zlib data in a zTXt, iCCP or (compressed) iTXt chunk; empty if there is none."""
    _, sep, rest = data.partition(b"\x00")
    if not sep:
        return b""
    if kind in (b"zTXt", b"iCCP"):
        return rest[1:]  # after the compression method byte
    if rest[:1] != b"\x01":  # iTXt: compression flag, method, language, translated keyword
        return b""
    parts = rest[2:].split(b"\x00", 2)
    return parts[2] if len(parts) == 3 else b""


def _inflated_size(data: bytes, limit: int) -> int:
    """How many bytes ``data`` inflates to, stopping once past ``limit`` (output discarded)."""
    inflater = zlib.decompressobj()
    total = 0
    try:
        while data and total <= limit and not inflater.eof:
            total += len(inflater.decompress(data, 64 * 1024))
            data = inflater.unconsumed_tail
    except zlib.error:
        pass  # broken data inflates no further, in Pillow too; what came out still counts
    return total


def _heic_end(stream: BinaryIO, size: int) -> int:
    """Offset where the top-level ISO BMFF boxes stop describing the file."""
    pos = 0
    for _ in range(_MAX_HEIC_BOXES):
        if pos >= size:
            return pos
        header = _read_at(stream, pos, 16)
        if len(header) < 8:
            return pos
        box_size, kind = struct.unpack_from(">I4s", header)
        header_size = 8
        if box_size == 1 and len(header) == 16:
            (box_size,) = struct.unpack_from(">Q", header, 8)
            header_size = 16
        elif box_size == 0:
            box_size = size - pos  # the last box runs to the end of the file
        if (box_size < header_size or pos + box_size > size
                or not all(0x20 <= c <= 0x7E for c in kind)):
            return pos  # not a box: whatever is here follows the image
        pos += box_size
    raise _Malformed("HEIC has too many boxes")


# -- PDF -----------------------------------------------------------------------------------


def _pdf_limits() -> AbstractContextManager[object]:
    """pypdf limits for this inspection only (a context variable, so other threads and other
    users of pypdf keep theirs): inflate little, since only structure is read."""
    try:
        from pypdf import Configuration, apply_configuration
    except ImportError:  # pypdf < 6.18 has no per-context limits; its 75 MB defaults apply
        return contextlib.nullcontext()
    wanted = {"zlib_maximum_output_length": _PDF_MAX_DECODED,
              "lzw_maximum_output_length": _PDF_MAX_DECODED,
              "run_length_maximum_output_length": _PDF_MAX_DECODED,
              "brotli_maximum_output_length": _PDF_MAX_DECODED,
              "array_based_stream_maximum_output_length": _PDF_MAX_DECODED,
              "stream_decoding_work_maximum_length": 4 * _PDF_MAX_DECODED,
              "page_tree_maximum_entries": _PDF_MAX_PAGE_TREE_ENTRIES}
    known = {field.name for field in dataclasses.fields(Configuration)}
    overrides: dict[str, Any] = {k: v for k, v in wanted.items() if k in known}
    return apply_configuration(None, **overrides)


def _pdf_metadata(stream: BinaryIO) -> dict[str, Any]:
    try:
        with _pdf_limits():
            stream.seek(0)
            reader = PdfReader(stream, strict=False)
            metadata: dict[str, Any] = {}
            if reader.is_encrypted:
                # Decision: a PDF that opens without a password (an "owner password" only
                # restricts printing or editing) opens without a prompt in every viewer, so
                # it is inspected like any other. One that needs a password cannot be looked
                # into (strings, streams and object streams are encrypted), and accepting it
                # unchecked would let active content through, so it is refused.
                if _decrypt_without_password(reader) == PasswordType.NOT_DECRYPTED:
                    raise InvalidDocument(_PDF_ENCRYPTED)
                metadata["encrypted"] = True
            # Counting pages walks the page tree (dictionaries only); no content stream is
            # decoded, so a stream that would inflate to gigabytes is never inflated.
            metadata["pages"] = len(reader.pages)
            reason = _pdf_active_content(reader)
            if reason is not None:
                raise InvalidDocument(reason)
            return metadata
    except InvalidDocument:
        raise
    except LimitReachedError as exc:
        raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: {exc}") from exc
    except NotImplementedError as exc:
        # pypdf reads the encryption dictionary on opening and refuses schemes it lacks
        # (certificate or third-party security handlers), as it does unknown filters.
        raise InvalidDocument(f"{_PDF_UNSUPPORTED}: {exc}") from exc
    # Broken input surfaces from pypdf's parser in many shapes, asserts included. Stream
    # failures of the decrypting view (EnvelopeError) are none of these and propagate.
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            AssertionError, RecursionError, struct.error, zlib.error) as exc:
        raise InvalidDocument(f"corrupt PDF: {exc}") from exc


def _decrypt_without_password(reader: PdfReader) -> PasswordType:
    try:
        return reader.decrypt("")
    except (DependencyError, NotImplementedError) as exc:
        # An encryption scheme pypdf cannot handle is one we cannot inspect.
        log.info("PDF encryption not supported: %s", exc)
        return PasswordType.NOT_DECRYPTED


class _PdfWalk:
    """Visits PDF objects at most once per role, within a budget, resolving references
    lazily; a reference loop or a huge structure therefore cannot keep it busy."""

    def __init__(self, reader: PdfReader) -> None:
        self._budget = _PDF_WALK_BUDGET
        self._seen: set[tuple[str, int, int]] = set()
        self.todo: list[tuple[str, Any]] = []
        # pypdf keeps every object it reads (a few KB each once parsed); the walk drops what
        # it added every so often, so memory does not grow with the number of objects.
        self._cache: dict[tuple[Any, Any], Any] = reader.resolved_objects
        self._added: list[tuple[int, int]] = []

    def open(self, role: str, value: Any) -> Any:
        """The object ``value`` refers to, or None if it was already visited in this role."""
        if not isinstance(value, IndirectObject):
            return value  # already parsed as part of its container: nothing to read
        key = (role, value.idnum, value.generation)
        if key in self._seen:
            return None
        self._seen.add(key)
        # Only reading objects costs time; a budget on reads bounds the whole walk.
        self._budget -= 1
        if self._budget < 0:
            raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: more than {_PDF_WALK_BUDGET} objects")
        if len(self._added) >= _PDF_WALK_CACHED:
            # Objects still in use stay alive through their references; only pypdf's cache
            # lets go of them (it reads them again if ever asked).
            for cached in self._added:
                self._cache.pop(cached, None)
            self._added.clear()
        cache_key = (value.generation, value.idnum)
        if cache_key not in self._cache:
            self._added.append(cache_key)
        return value.get_object()

    def dictionary(self, role: str, value: Any) -> DictionaryObject | None:
        obj = self.open(role, value)
        return obj if isinstance(obj, DictionaryObject) else None

    def items(self, role: str, value: Any) -> list[Any]:
        """The elements of an array (or the single object where one is allowed)."""
        obj = self.open(role, value)
        if isinstance(obj, ArrayObject):
            return list(obj)
        return [] if obj is None else [obj]

    def tree_has_entries(self, role: str, value: Any) -> bool:
        """Whether a name tree (/JavaScript, /EmbeddedFiles) holds at least one entry."""
        nodes = [value]
        while nodes:
            node = self.dictionary(role, nodes.pop())
            if node is None:
                continue
            if self.items(role + "/Names", _entry(node, "/Names")):
                return True
            nodes.extend(self.items(role + "/Kids", _entry(node, "/Kids")))
        return False

    def drain(self) -> str | None:
        """Check everything queued; the reason to reject, if any."""
        while self.todo:
            role, value = self.todo.pop()
            if role == "action":
                for item in self.items("action-list", value):
                    reason = self._action(item)
                    if reason is not None:
                        return reason
            elif role == "triggers":  # /AA: trigger name -> action
                triggers = self.dictionary(role, value)
                if triggers is not None:
                    self.todo.extend(("action", _entry(triggers, key)) for key in triggers)
            elif role == "annots":
                self.todo.extend(("annot", item) for item in self.items(role, value))
            elif role == "files":  # /AF: associated files (PDF 2.0)
                for item in self.items(role, value):
                    spec = self.dictionary("filespec", item)
                    if spec is not None and "/EF" in spec:
                        return _PDF_EMBEDDED
            else:
                reason = self._node(role, value)
                if reason is not None:
                    return reason
        return None

    def _node(self, role: str, value: Any) -> str | None:
        node = self.dictionary(role, value)
        if node is None:
            return None
        if role == "annot":
            subtype = self.open("name", _entry(node, "/Subtype"))
            if subtype == "/FileAttachment":
                return _PDF_EMBEDDED
            if subtype in ("/RichMedia", "/3D"):
                return _PDF_RICH_MEDIA
            # A widget's field may carry actions without being listed in /AcroForm.
            self.todo.append(("field", _entry(node, "/Parent")))
        elif role == "field":
            self.todo.extend(("field", kid) for kid in self.items("kids", _entry(node, "/Kids")))
        elif role == "outline":  # bookmarks: siblings by /Next, children by /First
            self.todo.append(("outline", _entry(node, "/Next")))
            self.todo.append(("outline", _entry(node, "/First")))
        self.todo.append(("action", _entry(node, "/A")))
        self.todo.append(("triggers", _entry(node, "/AA")))
        return None

    def _action(self, value: Any) -> str | None:
        action = self.dictionary("action", value)
        if action is None:
            return None  # absent, already checked, or a destination array
        kind = self.open("name", _entry(action, "/S"))
        if kind in ("/JavaScript", "/JS") or "/JS" in action:  # also a Rendition's /JS
            return _PDF_JAVASCRIPT
        if kind == "/Launch":
            return _PDF_LAUNCH
        if kind == "/RichMediaExecute":
            return _PDF_RICH_MEDIA
        if kind == "/URI" and _is_javascript_uri(self.open("uri", _entry(action, "/URI"))):
            return _PDF_JAVASCRIPT
        self.todo.append(("action", _entry(action, "/Next")))  # an action or an array
        return None


def _entry(dictionary: DictionaryObject, key: str) -> Any:
    """The raw (unresolved) value of ``key``, or None; pypdf's raw_get raises when absent."""
    return dict.get(dictionary, key)


def _is_javascript_uri(uri: Any) -> bool:
    if isinstance(uri, bytes):
        uri = uri.decode("latin-1")
    if not isinstance(uri, str):
        return False
    # Browsers ignore leading whitespace and control characters before the scheme.
    return uri.lstrip("".join(map(chr, range(33)))).lower().startswith("javascript:")


def _pdf_active_content(reader: PdfReader) -> str | None:
    """Why the document must be refused for active content, or None.

    Only the latest revision's structure is walked, reachable from the catalog, as viewers
    do: the name trees, the document and page actions, annotations, form fields, bookmarks
    and associated files. Content streams are never read.
    """
    walk = _PdfWalk(reader)
    root = reader.root_object
    names = walk.dictionary("names", _entry(root, "/Names"))
    if names is not None:
        if walk.tree_has_entries("javascript", _entry(names, "/JavaScript")):
            return _PDF_JAVASCRIPT
        if walk.tree_has_entries("embedded", _entry(names, "/EmbeddedFiles")):
            return _PDF_EMBEDDED
    form = walk.dictionary("acroform", _entry(root, "/AcroForm"))
    if form is not None:
        if "/XFA" in form:
            return _PDF_XFA
        walk.todo.extend(("field", field) for field in walk.items("fields",
                                                                  _entry(form, "/Fields")))
    walk.todo.append(("action", _entry(root, "/OpenAction")))
    walk.todo.append(("triggers", _entry(root, "/AA")))
    walk.todo.append(("files", _entry(root, "/AF")))
    outlines = walk.dictionary("outlines", _entry(root, "/Outlines"))
    if outlines is not None:
        walk.todo.append(("outline", _entry(outlines, "/First")))
    reason = walk.drain()
    for page in reader.pages:
        if reason is not None:
            break
        walk.todo.append(("triggers", _entry(page, "/AA")))
        walk.todo.append(("annots", _entry(page, "/Annots")))
        walk.todo.append(("files", _entry(page, "/AF")))
        reason = walk.drain()
    return reason
