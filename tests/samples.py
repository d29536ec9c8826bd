"""Documents for the tests, made on the fly so each carries its own recognisable marker."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator

from PIL import Image


def marker() -> bytes:
    return b"PLAINTEXT-MARKER-" + secrets.token_hex(12).encode()


def pdf(mark: bytes = b"", pages: int = 1, padding: int = 0) -> bytes:
    return b"".join(pdf_parts(mark, pages, padding))


def pdf_parts(mark: bytes = b"", pages: int = 1, padding: int = 0,
              piece: int = 1024 * 1024) -> Iterator[bytes]:
    """A valid PDF, optionally with an unused stream of ``padding`` bytes, yielded in pieces
    so a large one never has to exist in memory."""
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + i) for i in range(pages))
        + b"] /Count %d >>" % pages,
    ]
    content = b"BT /F1 12 Tf 72 720 Td (" + mark + b") Tj ET"
    objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    for _ in range(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 3 0 R >>")
    offsets: list[int] = []
    pos = 0
    head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    yield head
    pos += len(head)
    for number, body in enumerate(objects, start=1):
        chunk = b"%d 0 obj\n" % number + body + b"\nendobj\n"
        offsets.append(pos)
        yield chunk
        pos += len(chunk)
    if padding:
        number = len(objects) + 1
        start = b"%d 0 obj\n<< /Length %d >>\nstream\n" % (number, padding)
        offsets.append(pos)
        yield start
        pos += len(start)
        block = bytes(range(256)) * (piece // 256)
        left = padding
        while left:
            part = block[: min(left, len(block))]
            yield part
            left -= len(part)
        end = b"\nendstream\nendobj\n"
        yield end
        pos += padding + len(end)
    xref = pos
    table = [b"xref\n0 %d\n" % (len(offsets) + 1), b"0000000000 65535 f \n"]
    table += [b"%010d 00000 n \n" % off for off in offsets]
    yield b"".join(table)
    yield b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(offsets) + 1,
                                                                             xref)


def pdf_size(mark: bytes = b"", pages: int = 1, padding: int = 0) -> int:
    return sum(len(part) for part in pdf_parts(mark, pages, padding))


def jpeg(mark: bytes = b"", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "JPEG", comment=mark)
    return out.getvalue()


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (0, 90, 200)).save(out, "PNG")
    return out.getvalue()
