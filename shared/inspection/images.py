"""Images (JPEG, PNG, TIFF, HEIC): the structural walks that find where an image ends (and
bound what Pillow will read on opening it), the pixel caps, and the metadata from the headers."""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Final

from PIL import Image

from shared.inspection.errors import InvalidDocument
from shared.inspection.streams import read_at

# A delivery photo or scan has no business above this many pixels; beyond it decoding could
# be used to exhaust memory (a decompression bomb).
MAX_IMAGE_PIXELS = 120_000_000

# Reasons shown to users. The "corrupt image" prefix predates the inspection's hardening and
# is matched by clients and tests, so it is kept.
_TRAILING: Final = "unexpected data after the end of the image"
_METADATA_TOO_LARGE: Final = "image metadata is too large"

# Unit of every sequential read: large enough to be fast, small enough to keep memory flat.
_BLOCK: Final = 1024 * 1024
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
# The image metadata (item locations, properties) of a real HEIC is a few KB, a little more
# with EXIF; it is read whole, within this.
_HEIC_META_MAX: Final = 1024 * 1024
MAX_TIFF_PAGES: Final = 1_000

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


class _Malformed(Exception):
    """The structure of an image is broken; becomes "corrupt image: <message>"."""


def image_metadata(media_type: str, stream: BinaryIO, size: int) -> dict[str, Any]:
    if media_type == "image/png":
        check_image_end(_png_end, stream, size)
    elif media_type == "image/jpeg":
        check_image_end(_jpeg_file_end, stream, size)
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
    except MemoryError as exc:
        # Tags declaring millions of values (a TIFF's) can exhaust memory before any pixel
        # is read: the document is refused, not retried until it is dead-lettered.
        raise InvalidDocument("image too large to inspect: its metadata exhausts memory") \
            from exc
    # What Pillow raises on broken headers (KeyError: an unknown TIFF compression or mode).
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
            OverflowError, struct.error, zlib.error) as exc:
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


def check_image_end(find_end: Callable[[BinaryIO, int], int], stream: BinaryIO,
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
    if extra <= _SAMSUNG_TRAILER_LIMIT and read_at(stream, size - 4, 4) == _SAMSUNG_TRAILER:
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
        if end >= size or read_at(stream, end, 3) != b"\xff\xd8\xff":
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
    if read_at(stream, start, 2) != b"\xff\xd8":
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
        raw = read_at(stream, pos, 2)
        if len(raw) < 2:
            raise _Malformed("JPEG ends before its end-of-image marker")
        (length,) = struct.unpack(">H", raw)
        if length < 2:
            raise _Malformed(f"JPEG segment {code:#04x} has an invalid length")
        if code in _JPEG_SOF:
            frame = read_at(stream, pos + 2, 5)
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
    first = read_at(stream, pos, 1)
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
    if read_at(stream, 0, 8) != _PNG_SIGNATURE:
        raise _Malformed("not a PNG file")
    pos = 8
    metadata_bytes = 0
    inflated = 0
    seen_image_data = False
    for index in range(_MAX_PNG_CHUNKS):
        header = read_at(stream, pos, 8)
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


def heic_metadata(stream: BinaryIO, size: int) -> dict[str, Any]:
    """What a HEIC file declares, from its boxes (there is no HEIC decoder here): it must
    have the image metadata (`meta`) with at least one image size (`ispe`, mandatory for
    every HEIF image item), each within the pixel cap, and image data (`mdat`, or `idat`
    inside `meta`). Returns the largest declared size."""
    check_image_end(heic_end, stream, size)
    try:
        top = _heic_top_level(stream, size)
        meta = top.get(b"meta")
        if meta is None:
            raise _Malformed("HEIC has no image metadata (meta box)")
        children = dict(_heic_boxes(meta[4:]))  # a full box: version and flags first
        if b"mdat" not in top and b"idat" not in children:
            raise _Malformed("HEIC has no image data (mdat or idat box)")
        properties = dict(_heic_boxes(children.get(b"iprp", b""))).get(b"ipco", b"")
        sizes = [struct.unpack_from(">II", payload, 4) for kind, payload
                 in _heic_boxes(properties) if kind == b"ispe" and len(payload) >= 12]
    except struct.error as exc:
        raise InvalidDocument(f"corrupt image: HEIC box too short: {exc}") from exc
    except _Malformed as exc:
        raise InvalidDocument(f"corrupt image: {exc}") from exc
    if not sizes:
        raise InvalidDocument("corrupt image: HEIC declares no image size (ispe)")
    for width, height in sizes:
        _check_pixels(width, height)
    width, height = max(sizes, key=lambda wh: wh[0] * wh[1])
    return {"width": width, "height": height}


def _heic_top_level(stream: BinaryIO, size: int) -> dict[bytes, bytes]:
    """The top-level boxes by type, with the payload of `meta` only (the media data is
    never read), up to where heic_end says the image ends."""
    found: dict[bytes, bytes] = {}
    for pos, kind, header_size, box_size in _top_level_boxes(stream, size):
        payload = b""
        if kind == b"meta":
            if box_size - header_size > _HEIC_META_MAX:
                raise _Malformed(f"HEIC metadata larger than {_HEIC_META_MAX} bytes")
            payload = read_at(stream, pos + header_size, box_size - header_size)
        found.setdefault(kind, payload)
    return found


def _heic_boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (type, payload) of each box in ``data``, a container's payload."""
    pos = 0
    for _ in range(_MAX_HEIC_BOXES):
        if pos + 8 > len(data):
            return
        box_size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if box_size == 1:
            (box_size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif box_size == 0:
            box_size = len(data) - pos
        if box_size < header or pos + box_size > len(data):
            raise _Malformed(f"HEIC box {kind!r} overruns its container")
        yield kind, data[pos + header:pos + box_size]
        pos += box_size
    raise _Malformed("HEIC has too many boxes")


def heic_end(stream: BinaryIO, size: int) -> int:
    """Offset where the top-level ISO BMFF boxes stop describing the file."""
    end = 0
    for pos, _, _, box_size in _top_level_boxes(stream, size):
        end = pos + box_size
    return end


def _top_level_boxes(stream: BinaryIO, size: int) -> Iterator[tuple[int, bytes, int, int]]:
    """(offset, type, header size, box size) of each top-level box, until what follows is
    not a box (the end of the image; anything after it is trailing data)."""
    pos = 0
    for _ in range(_MAX_HEIC_BOXES):
        if pos >= size:
            return
        header = read_at(stream, pos, 16)
        if len(header) < 8:
            return
        box_size, kind = struct.unpack_from(">I4s", header)
        header_size = 8
        if box_size == 1 and len(header) == 16:
            (box_size,) = struct.unpack_from(">Q", header, 8)
            header_size = 16
        elif box_size == 0:
            box_size = size - pos  # the last box runs to the end of the file
        if (box_size < header_size or pos + box_size > size
                or not all(0x20 <= c <= 0x7E for c in kind)):
            return  # not a box: whatever is here follows the image
        yield pos, kind, header_size, box_size
        pos += box_size
    raise _Malformed("HEIC has too many boxes")

