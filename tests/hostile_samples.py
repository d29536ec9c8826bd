"""Hostile documents (and their harmless twins) for the inspection tests, made at test time.

Nothing here is large: a deflate stream of N zero bytes is assembled from one precomputed
segment per MiB (about 1 KiB each), so a "gigabyte" bomb is about 1 MB and takes
milliseconds to build. PDFs are written as raw syntax with exact cross-reference tables,
so each one has precisely the structure its test is about.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence

from PIL import Image
from pypdf import PdfReader, PdfWriter

from tests import samples

MIB = 1024 * 1024
GIB = 1024 * MIB
PDF_HEADER = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
JS_ACTION = b"<< /Type /Action /S /JavaScript /JS (app.alert('pwned')) >>"
URI_ACTION = b"<< /Type /Action /S /URI /URI (https://example.com/delivery/1042) >>"


# -- compression ---------------------------------------------------------------------------


@functools.cache
def _zero_segment(length: int) -> bytes:
    """Deflate blocks producing ``length`` zeros, byte-aligned and referring to nothing
    before them (a fresh compressor, ended by a full flush), so they can be repeated."""
    compressor = zlib.compressobj(9)
    data = compressor.compress(bytes(length)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return data[2:]  # without the zlib header


def zlib_zeros(zeros: int, prefix: bytes = b"") -> bytes:
    """A zlib stream inflating to ``prefix`` followed by ``zeros`` zero bytes."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)]
    whole, rest = divmod(zeros, MIB)
    parts.append(_zero_segment(MIB) * whole)
    if rest:
        parts.append(_zero_segment(rest))
    parts.append(b"\x03\x00")  # an empty final block with fixed Huffman codes
    # Adler-32 of the whole output: zeros leave the low sum alone and add it to the high one.
    checksum = zlib.adler32(prefix)
    low, high = checksum & 0xFFFF, checksum >> 16
    high = (high + zeros * low) % 65521
    parts.append(struct.pack(">I", (high << 16) | low))
    return b"".join(parts)


def raw_deflate_zeros(zeros: int) -> bytes:
    """Raw deflate (as in ZIP) of ``zeros`` zero bytes."""
    return zlib_zeros(zeros)[2:-4]


# -- PDF -----------------------------------------------------------------------------------


def stream_object(data: bytes, entries: bytes = b"") -> bytes:
    return b"<< /Length %d %b >>\nstream\n" % (len(data), entries) + data + b"\nendstream"


def raw_pdf(objects: Sequence[bytes], *, trailer: bytes = b"") -> bytes:
    """A PDF whose object ``n`` is ``objects[n - 1]`` (object 1 is the catalog), with a
    classic cross-reference table."""
    out = bytearray(PDF_HEADER)
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %b >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, trailer, xref)
    return bytes(out)


def document(catalog: bytes = b"", page: bytes = b"", extra: Sequence[bytes] = (),
             content: bytes | None = None) -> bytes:
    """One page; objects 1-4 are catalog, page tree, page and content, ``extra`` are 5, 6..
    ``catalog`` and ``page`` are added to those dictionaries; ``content`` replaces the
    content stream object."""
    text = b"BT /F1 12 Tf 72 720 Td (Proof of delivery) Tj ET"
    return raw_pdf([
        b"<< /Type /Catalog /Pages 2 0 R %b >>" % catalog,
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R %b >>" % page,
        stream_object(text) if content is None else content,
        *extra,
    ])


def link(action: bytes) -> bytes:
    return b"<< /Type /Annot /Subtype /Link /Rect [72 72 200 90] /A %b >>" % action


def pdf_open_action(action: bytes = JS_ACTION) -> bytes:
    return document(catalog=b"/OpenAction 5 0 R", extra=[action])


def pdf_js_after_harmless_action() -> bytes:
    """JavaScript hidden in the /Next chain of an innocent link action."""
    first = URI_ACTION[:-2] + b"/Next [5 0 R] >>"
    return document(catalog=b"/OpenAction %b" % first, extra=[JS_ACTION])


def pdf_obfuscated_javascript() -> bytes:
    """/S /JavaScript spelled with a #-escape, which a byte search would miss."""
    return pdf_open_action(b"<< /S /Java#53cript /JS (app.alert(1)) >>")


def pdf_names_javascript() -> bytes:
    return document(catalog=b"/Names << /JavaScript 5 0 R >>",
                    extra=[b"<< /Names [(init) 6 0 R] >>", JS_ACTION])


def pdf_page_additional_action() -> bytes:
    return document(page=b"/AA << /O 5 0 R >>", extra=[JS_ACTION])


def pdf_launch() -> bytes:
    return document(page=b"/Annots [5 0 R]",
                    extra=[link(b"<< /S /Launch /F (C:\\\\Windows\\\\System32\\\\cmd.exe) >>")])


def pdf_link(uri: bytes = b"https://example.com/tracking") -> bytes:
    return document(page=b"/Annots [5 0 R]", extra=[link(b"<< /S /URI /URI (%b) >>" % uri)])


def pdf_embedded_file() -> bytes:
    return document(
        catalog=b"/Names << /EmbeddedFiles << /Names [(invoice.exe) 5 0 R] >> >>",
        extra=[b"<< /Type /Filespec /F (invoice.exe) /EF << /F 6 0 R >> >>",
               stream_object(b"MZ not really a program", b"/Type /EmbeddedFile")])


def pdf_empty_embedded_files() -> bytes:
    """An empty /EmbeddedFiles tree, as some tools leave behind: nothing is attached."""
    return document(catalog=b"/Names << /EmbeddedFiles << /Names [] >> >>")


def pdf_file_attachment_annotation() -> bytes:
    return document(page=b"/Annots [5 0 R]", extra=[
        b"<< /Type /Annot /Subtype /FileAttachment /Rect [0 0 10 10] /FS 6 0 R >>",
        b"<< /Type /Filespec /F (a.zip) /EF << /F 7 0 R >> >>",
        stream_object(b"PK\x05\x06" + bytes(18), b"/Type /EmbeddedFile")])


def pdf_rich_media() -> bytes:
    return document(page=b"/Annots [5 0 R]", extra=[
        b"<< /Type /Annot /Subtype /RichMedia /Rect [0 0 10 10] >>"])


def pdf_xfa() -> bytes:
    return document(catalog=b"/AcroForm << /Fields [] /XFA 5 0 R >>",
                    extra=[stream_object(b"<xdp:xdp xmlns:xdp='http://ns.adobe.com/xdp/'/>")])


def pdf_form(field_actions: bytes = b"") -> bytes:
    """A text field that is not on any page, optionally with additional actions."""
    return document(catalog=b"/AcroForm << /Fields [5 0 R] >>", extra=[
        b"<< /FT /Tx /T (signature) /V (J. Doe) %b >>" % field_actions, JS_ACTION])


def pdf_outline(action: bytes = JS_ACTION) -> bytes:
    """A bookmark whose action runs when it is clicked."""
    return document(catalog=b"/Outlines 5 0 R", extra=[
        b"<< /Type /Outlines /First 6 0 R /Last 6 0 R /Count 1 >>",
        b"<< /Title (Delivery) /Parent 5 0 R /A 7 0 R >>",
        action])


def pdf_outline_loop() -> bytes:
    """A bookmark that is its own next sibling and child: must not hang the inspection."""
    return document(catalog=b"/Outlines 5 0 R", extra=[
        b"<< /Type /Outlines /First 6 0 R /Count 1 >>",
        b"<< /Title (Loop) /Parent 5 0 R /Next 6 0 R /First 6 0 R >>"])


def pdf_pages(pages: int, links_per_page: int = 0) -> bytes:
    """Many pages sharing one content stream, each with its own link annotations."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
                            stream_object(b"BT /F1 12 Tf 72 720 Td (Page) Tj ET")]
    kids = []
    for page in range(pages):
        number = len(objects) + 1
        links = range(number + 1, number + 1 + links_per_page)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 3 0 R "
                       b"/Annots [%b] >>" % b" ".join(b"%d 0 R" % n for n in links))
        objects.extend(link(b"<< /S /URI /URI (https://example.com/%d/%d) >>" % (page, n))
                       for n in links)
        kids.append(b"%d 0 R" % number)
    objects[1] = b"<< /Type /Pages /Kids [%b] /Count %d >>" % (b" ".join(kids), pages)
    return raw_pdf(objects)


def pdf_shared_name_launch() -> bytes:
    """A Launch action whose /S is an indirect name also used as an annotation's /Subtype:
    a walk that skips objects it has seen reads it as the subtype and never as the type."""
    return document(page=b"/Annots [6 0 R 5 0 R]", extra=[
        b"<< /Type /Annot /Subtype 7 0 R /Rect [0 0 1 1] >>",
        link(b"<< /S 7 0 R /F (calc.exe) >>"),
        b"/Launch"])


def pdf_shared_name_attachment() -> bytes:
    """The mirror: /FileAttachment read first as an action's type, then as a subtype."""
    return document(page=b"/Annots [6 0 R 5 0 R]", extra=[
        link(b"<< /S 7 0 R >>"),
        b"<< /Type /Annot /Subtype 7 0 R /Rect [0 0 1 1] /FS << /EF << /F 8 0 R >> >> >>",
        b"/FileAttachment",
        stream_object(b"payload", b"/Type /EmbeddedFile")])


def pdf_dangling_references(count: int) -> bytes:
    """An open action listing ``count`` references to objects that do not exist."""
    refs = b" ".join(b"%d 0 R" % (500_000 + n) for n in range(count))
    return document(catalog=b"/OpenAction [%b]" % refs)


def pdf_repeated_page(times: int, annotations: int, action: bytes = URI_ACTION) -> bytes:
    """A page tree listing one page ``times`` times; the page holds ``annotations`` inline
    links with ``action``."""
    annots = b" ".join([link(action)] * annotations)
    return raw_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%b] /Count %d >>" % (b" ".join([b"3 0 R"] * times), times),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Annots [%b] >>" % annots,
    ])


def pdf_xref_stream(entries: int) -> bytes:
    """One page, indexed by a cross-reference stream of ``entries`` entries (all but the
    first five free): a few KB on disk, an entry each in pypdf's tables."""
    out = bytearray(PDF_HEADER)
    offsets = []
    for number, body in enumerate([
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>"], start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
    xref = len(out)
    rows = [struct.pack(">BIH", 0, 0, 65535)]
    rows += [struct.pack(">BIH", 1, offset, 0) for offset in [*offsets, xref]]
    rows += [struct.pack(">BIH", 0, 0, 0)] * (entries - len(rows))
    data = zlib.compress(b"".join(rows), 9)
    out += b"4 0 obj\n" + stream_object(data, b"/Type /XRef /Size %d /W [1 4 2] /Root 1 0 R "
                                            b"/Filter /FlateDecode" % entries)
    out += b"\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def pdf_object_stream_bomb(streams: int, inflated: int = 12 * MIB) -> bytes:
    """An open action listing one object in each of ``streams`` object streams, each of
    which inflates to ``inflated`` bytes (under the per-stream limit): reading the objects
    decodes every stream whole."""
    return _with_object_streams(
        b"/OpenAction [%b]" % b" ".join(b"%d 0 R" % (1000 + k) for k in range(streams)),
        [{1000 + k: b"<< /S /GoTo /D [3 0 R /Fit] >>"} for k in range(streams)],
        padding=inflated)


def pdf_form_in_object_stream(objects: int, fields: int) -> bytes:
    """A form of ``fields`` fields, kept with other objects (``objects`` in all) in one
    object stream apart from the catalog."""
    return _with_object_streams(
        b"/AcroForm << /Fields [%b] >>" % b" ".join(b"%d 0 R" % (1000 + n)
                                                 for n in range(fields)),
        [{1000 + n: b"<< /FT /Tx /T (field%d) >>" % n for n in range(objects)}])


def _with_object_streams(catalog: bytes, streams: Sequence[dict[int, bytes]],
                         padding: int = 0) -> bytes:
    """Catalog (with ``catalog`` added), page tree and page as plain objects 1-3; each of
    ``streams`` (object number -> body) an object stream 4, 5..; a cross-reference stream
    last. ``padding`` bytes of "x" follow each stream's objects."""
    out = bytearray(PDF_HEADER)
    offsets = {}
    for number, body in enumerate([
            b"<< /Type /Catalog /Pages 2 0 R %b >>" % catalog,
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>"], start=1):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
    packed = {}
    for k, objects in enumerate(streams):
        index, bodies, at = [], [], 0
        for position, (number, body) in enumerate(objects.items()):
            index.append(b"%d %d" % (number, at))
            bodies.append(body + b"\n")
            at += len(body) + 1
            packed[number] = (4 + k, position)
        head = b" ".join(index) + b"\n"
        data = zlib.compress(head + b"".join(bodies) + b"x" * padding, 9)
        offsets[4 + k] = len(out)
        out += b"%d 0 obj\n%b\nendobj\n" % (4 + k, stream_object(
            data, b"/Type /ObjStm /N %d /First %d /Filter /FlateDecode"
            % (len(objects), len(head))))
    xref_number = max(packed) + 1
    offsets[xref_number] = len(out)
    rows = []
    for number in range(xref_number + 1):
        if number in offsets:
            rows.append(struct.pack(">BIH", 1, offsets[number], 0))
        elif number in packed:
            rows.append(struct.pack(">BIH", 2, *packed[number]))
        else:
            rows.append(struct.pack(">BIH", 0, 0, 0))
    out += b"%d 0 obj\n%b\nendobj\n" % (xref_number, stream_object(
        zlib.compress(b"".join(rows)), b"/Type /XRef /Size %d /W [1 4 2] /Root 1 0 R "
        b"/Filter /FlateDecode" % (xref_number + 1)))
    out += b"startxref\n%d\n%%%%EOF\n" % offsets[xref_number]
    return bytes(out)


def pdf_misplaced_references(count: int) -> bytes:
    """An open action listing ``count`` references that pypdf cannot find where the
    cross-reference table says, alternately: object 5, whose entry points at object 4's
    header, and generation 1 of object 3, which has only generation 0."""
    refs = b" ".join(b"5 0 R" if n % 2 else b"3 1 R" for n in range(count))
    return misplaced(document(catalog=b"/OpenAction [%b]" % refs, extra=[URI_ACTION]), 5)


def misplaced(data: bytes, number: int) -> bytes:
    """``data`` (a ``raw_pdf``) with object ``number``'s cross-reference entry pointing at
    the object before it: a viewer that rebuilds the table still finds the object."""
    table = data.rindex(b"\nxref\n") + 1
    rows = data[table:].split(b"\n")  # "xref", "0 N", the free entry, then objects 1..
    rows[2 + number] = rows[1 + number]
    return data[:table] + b"\n".join(rows)


def pdf_startxref_overflow() -> bytes:
    """A startxref too large for a file offset."""
    data = document()
    head, _, _ = data.rpartition(b"startxref\n")
    return head + b"startxref\n99999999999999999999\n%%EOF\n"


def pdf_content_bomb(inflated: int = GIB) -> bytes:
    """A page whose content stream inflates to ``inflated`` bytes (about inflated/1000 on
    disk)."""
    data = zlib_zeros(inflated)
    return document(content=stream_object(data, b"/Filter /FlateDecode"))


def pdf_incremental_update(*, javascript: bool) -> bytes:
    """tests.samples' one-page PDF plus an incremental update adding a second page and,
    optionally, an /OpenAction running JavaScript (the update is what viewers show)."""
    base = samples.pdf(pages=1)  # objects: 1 catalog, 2 pages, 3 content, 4 page
    found = re.search(rb"startxref\s+(\d+)\s+%%EOF\s*$", base)
    assert found is not None
    previous = int(found.group(1))
    updated = {
        2: b"<< /Type /Pages /Kids [4 0 R 5 0 R] /Count 2 >>",
        5: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 3 0 R >>",
    }
    if javascript:
        updated[1] = b"<< /Type /Catalog /Pages 2 0 R /OpenAction 6 0 R >>"
        updated[6] = JS_ACTION
    out = bytearray(base)
    offsets = {}
    for number, body in sorted(updated.items()):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n"
    for number, offset in sorted(offsets.items()):
        out += b"%d 1\n%010d 00000 n \n" % (number, offset)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Prev %d >>\nstartxref\n%d\n%%%%EOF\n" % (
        max(offsets) + 1, previous, xref)
    return bytes(out)


def pdf_linearized() -> bytes:
    """Two pages laid out as a linearized ("fast web view") PDF: linearization dictionary
    and first-page cross-reference section at the start, with /Prev to the main section at
    the end, whose startxref points back to the first one. No hint stream: readers that do
    not stream (pypdf, us) never use it."""
    text = stream_object(b"BT /F1 12 Tf 72 720 Td (Page) Tj ET")
    first = {  # first-page section: objects 5-8
        6: b"<< /Type /Catalog /Pages 1 0 R >>",
        7: b"<< /Type /Page /Parent 1 0 R /MediaBox [0 0 595 842] /Contents 8 0 R >>",
        8: text,
    }
    main = {  # main section: objects 1-3
        1: b"<< /Type /Pages /Kids [7 0 R 2 0 R] /Count 2 >>",
        2: b"<< /Type /Page /Parent 1 0 R /MediaBox [0 0 595 842] /Contents 3 0 R >>",
        3: text,
    }

    def build(length: int, main_xref: int, first_page_end: int) -> tuple[bytes, int, int]:
        out = bytearray(PDF_HEADER)
        offsets = {5: len(out)}
        out += (b"5 0 obj\n<< /Linearized 1 /L %010d /H [%010d 0] /O 7 /E %010d /N 2 "
                b"/T %010d >>\nendobj\n" % (length, 0, first_page_end, main_xref))
        first_xref = len(out)
        out += b"xref\n5 4\n"
        placeholder = len(out)
        out += b"0000000000 00000 n \n" * 4
        out += (b"trailer\n<< /Size 9 /Root 6 0 R /Prev %010d >>\nstartxref\n0\n%%%%EOF\n"
                % main_xref)
        for number, body in first.items():
            offsets[number] = len(out)
            out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
        out[placeholder: placeholder + 80] = b"".join(
            b"%010d 00000 n \n" % offsets[n] for n in (5, 6, 7, 8))
        end_first = len(out)
        for number, body in main.items():
            offsets[number] = len(out)
            out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
        xref = len(out)
        out += b"xref\n0 4\n0000000000 65535 f \n"
        out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in (1, 2, 3))
        out += b"trailer\n<< /Size 4 >>\nstartxref\n%d\n%%%%EOF\n" % first_xref
        return bytes(out), xref, end_first

    # Offsets are fixed-width, so a second pass with the real values changes no length.
    data, xref, end_first = build(0, 0, 0)
    data, _, _ = build(len(data), xref, end_first)
    return data


def pdf_object_streams(*, catalog: bytes = b"", extra: Sequence[bytes] = (),
                       zero_padding: int = 0) -> bytes:
    """PDF 1.5 layout: catalog, page tree, page and ``extra`` (numbered 5, 6..) inside a
    compressed object stream, found through a cross-reference stream. ``zero_padding``
    zero bytes after the objects make the object stream a decompression bomb."""
    packed = {1: b"<< /Type /Catalog /Pages 2 0 R %b >>" % catalog,
              2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
              3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>"}
    packed.update({5 + i: body for i, body in enumerate(extra)})
    objstm_number = 5 + len(extra)
    xref_number = objstm_number + 1
    index, bodies, at = [], [], 0
    for number, body in packed.items():
        index.append(b"%d %d" % (number, at))
        bodies.append(body + b"\n")
        at += len(body) + 1
    head = b" ".join(index) + b"\n"
    data = zlib_zeros(zero_padding, head + b"".join(bodies))

    out = bytearray(PDF_HEADER)
    offsets = {4: len(out)}
    out += b"4 0 obj\n%b\nendobj\n" % stream_object(b"BT /F1 12 Tf 72 720 Td (Hi) Tj ET")
    offsets[objstm_number] = len(out)
    out += b"%d 0 obj\n%b\nendobj\n" % (objstm_number, stream_object(
        data, b"/Type /ObjStm /N %d /First %d /Filter /FlateDecode" % (len(packed), len(head))))
    offsets[xref_number] = len(out)
    rows = [struct.pack(">BIH", 0, 0, 65535)]
    for number in range(1, xref_number + 1):
        if number in packed:
            rows.append(struct.pack(">BIH", 2, objstm_number, list(packed).index(number)))
        else:
            rows.append(struct.pack(">BIH", 1, offsets[number], 0))
    table = zlib.compress(b"".join(rows))
    out += b"%d 0 obj\n%b\nendobj\n" % (xref_number, stream_object(
        table, b"/Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Filter /FlateDecode"
        % (xref_number + 1)))
    out += b"startxref\n%d\n%%%%EOF\n" % offsets[xref_number]
    return bytes(out)


def pdf_encrypted(source: bytes, user_password: str) -> bytes:
    """``source`` encrypted (AES-256); an empty user password opens without a prompt."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(source)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret",
                   algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_from_pypdf() -> bytes:
    """A PDF as a real producer writes it (pypdf), with metadata."""
    writer = PdfWriter()
    for _ in range(2):
        writer.add_blank_page(width=595, height=842)
    writer.add_metadata({"/Title": "Proof of delivery #1042"})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_with_zip_inside() -> bytes:
    """PDF + ZIP polyglot: the archive sits in a stream at the end of the PDF, where ZIP
    readers look for it, and the PDF stays valid around it."""
    return document(extra=[stream_object(zip_archive())])


# -- archives ------------------------------------------------------------------------------


def zip_archive(name: str = "payload.js", data: bytes = b"WScript.Echo('pwned');") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


@functools.cache
def _zeros_crc(length: int) -> int:
    crc, block = 0, bytes(MIB)
    for _ in range(length // MIB):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(length % MIB), crc)


def zip_bomb(inflated: int = GIB) -> bytes:
    """A ZIP with one member inflating to ``inflated`` zero bytes (about 1/1000 on disk)."""
    name = b"delivery.pdf"
    data = raw_deflate_zeros(inflated)
    crc = _zeros_crc(inflated)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data),
                        inflated, len(name), 0) + name
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc,
                          len(data), inflated, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central),
                      len(local) + len(data), 0)
    return local + data + central + end


# -- images --------------------------------------------------------------------------------


def _save(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def jpeg(size: tuple[int, int] = (64, 48), **options: object) -> bytes:
    return _save(Image.new("RGB", size, (200, 30, 30)), "JPEG", **options)


def jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "ACME"  # Make
    exif[0x0110] = "FieldCam 3"  # Model
    exif[0x0132] = "2024:05:01 10:30:00"  # DateTime
    return jpeg((640, 480), exif=exif.tobytes(), quality=90)


def jpeg_with_exif_thumbnail() -> bytes:
    """EXIF with an embedded thumbnail: a complete JPEG, end marker included, inside APP1."""
    thumbnail = jpeg((16, 12))
    # Little-endian TIFF: IFD0 (no entries) -> IFD1 with the thumbnail's offset and length.
    ifd1_offset = 8 + 2 + 4
    thumb_offset = ifd1_offset + 2 + 3 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HI", 0, ifd1_offset)
    tiff += struct.pack("<H", 3)
    tiff += struct.pack("<HHII", 0x0103, 3, 1, 6)  # Compression: JPEG
    tiff += struct.pack("<HHII", 0x0201, 4, 1, thumb_offset)  # JPEGInterchangeFormat
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))  # ...Length
    tiff += struct.pack("<I", 0) + thumbnail
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    main = jpeg((320, 240))
    return main[:2] + segment + main[2:]


def jpeg_progressive() -> bytes:
    img = Image.effect_noise((256, 192), 64).convert("RGB")
    return _save(img, "JPEG", progressive=True, quality=85)


def jpeg_with_restart_markers() -> bytes:
    img = Image.effect_noise((256, 192), 64).convert("RGB")
    return _save(img, "JPEG", restart_marker_blocks=1, quality=85)


def jpeg_with_secondary_image() -> bytes:
    """A primary JPEG followed by a second complete one, as MPF phones store depth or HDR
    gain maps."""
    return jpeg((640, 480)) + jpeg((160, 120))


def jpeg_with_pdf_header() -> bytes:
    """JPEG + PDF polyglot: a comment near the start carries a PDF header."""
    return jpeg(comment=b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n")


def jpeg_with_appended_zip() -> bytes:
    return jpeg() + zip_archive()


def jpeg_with_appended_script() -> bytes:
    return jpeg() + b"<?php system($_GET['cmd']); ?>\n" * 32


def jpeg_with_padding() -> bytes:
    return jpeg() + bytes(4096)


def jpeg_with_samsung_trailer() -> bytes:
    """A photo with a small vendor metadata trailer after its end marker (Samsung's SEFT)."""
    entry = b"\x00\x00\x01\x0a" + struct.pack("<I", 14) + b"Image_UTC_Data" + b"1714555800000"
    directory = b"SEFH" + struct.pack("<III", 101, 1, 0) + bytes(300)
    return jpeg() + entry + directory + struct.pack("<I", len(directory)) + b"SEFT"


def jpeg_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A small JPEG whose frame header declares ``width`` x ``height`` pixels."""
    data = bytearray(jpeg((8, 8)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, idat: bytes, before_idat: Sequence[bytes] = ()) -> bytes:
    """An 8-bit RGB PNG with the given (compressed) image data."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + b"".join(before_idat) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    return _save(Image.new("RGB", size, (0, 90, 200)), "PNG")


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """Declares ``width`` x ``height`` pixels; its image data is a few bytes."""
    return png_raw(width, height, zlib.compress(bytes(1 + 3 * 8)))


def png_idat_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A legitimate-looking black image under the pixel cap whose IDAT inflates to
    ``height * (1 + 3 * width)`` bytes (300 MB for the default) from about 300 KB."""
    return png_raw(width, height, zlib_zeros(height * (1 + 3 * width)))


def png_text_bomb(chunks: int = 24, inflated: int = 512 * 1024) -> bytes:
    """Compressed text chunks before the image data, each inflating to ``inflated`` bytes:
    Pillow inflates (and keeps) them all when merely opening the file."""
    text = [_png_chunk(b"zTXt", b"Comment%d\x00\x00" % i + zlib_zeros(inflated))
            for i in range(chunks)]
    return png_raw(8, 8, zlib.compress(bytes(8 * 25)), text)


def png_with_pdf_header() -> bytes:
    text = _png_chunk(b"tEXt", b"Comment\x00%PDF-1.4\n% hidden document")
    return png_raw(8, 8, zlib.compress(bytes(8 * 25)), [text])


def png_with_appended_data() -> bytes:
    return png() + b"7z\xbc\xaf\x27\x1c" + bytes(range(256)) * 8


def png_with_appended_zip() -> bytes:
    return png() + zip_archive()


def png_with_bad_crc() -> bytes:
    data = bytearray(png())
    data[-1] ^= 0xFF  # IEND's CRC
    return bytes(data)


def tiff(pages: int = 3, size: tuple[int, int] = (64, 48)) -> bytes:
    frames = [Image.new("L", size, 40 * i) for i in range(pages)]
    return _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def tiff_raw(sizes: Sequence[tuple[int, int]]) -> bytes:
    """A bilevel TIFF with one page per size, each with a one-byte strip whatever it
    declares: the bomb is in the header, where nothing needs to be decoded to see it."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    entries_per_ifd = 8
    for page, (width, height) in enumerate(sizes):
        start = len(out)
        data_offset = start + 2 + entries_per_ifd * 12 + 4
        last = page == len(sizes) - 1
        out += struct.pack("<H", entries_per_ifd)
        out += struct.pack("<HHII", 256, 4, 1, width)  # ImageWidth
        out += struct.pack("<HHII", 257, 4, 1, height)  # ImageLength
        out += struct.pack("<HHIHH", 258, 3, 1, 1, 0)  # BitsPerSample
        out += struct.pack("<HHIHH", 259, 3, 1, 1, 0)  # Compression: none
        out += struct.pack("<HHIHH", 262, 3, 1, 1, 0)  # Photometric: black is zero
        out += struct.pack("<HHII", 273, 4, 1, data_offset)  # StripOffsets
        out += struct.pack("<HHII", 278, 4, 1, height)  # RowsPerStrip
        out += struct.pack("<HHII", 279, 4, 1, 1)  # StripByteCounts
        out += struct.pack("<I", 0 if last else data_offset + 1)
        out += b"\x00"
    return bytes(out)


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def heic(size: tuple[int, int] | None = (4032, 3024), *, media_data: bool = True,
         meta: bool = True, meta_last: bool = False) -> bytes:
    """The outline of a HEIC file as a phone writes it: ftyp; meta (a full box) with its
    handler and the image properties, among them the image's size (ispe, itself a full
    box), unless ``size`` is None; and the media data."""
    ftyp = _box(b"ftyp", b"heic" + struct.pack(">I", 0) + b"mif1heic")
    properties = _box(b"hvcC", bytes(23))
    if size is not None:
        properties += _box(b"ispe", bytes(4) + struct.pack(">II", *size))
    boxes = (_box(b"hdlr", bytes(8) + b"pict" + bytes(13))
             + _box(b"iprp", _box(b"ipco", properties) + _box(b"ipma", bytes(8))))
    meta_box = _box(b"meta", bytes(4) + boxes) if meta else b""
    mdat = _box(b"mdat", bytes(range(256)) * 4) if media_data else b""
    return ftyp + (mdat + meta_box if meta_last else meta_box + mdat)


def heic_with_appended_script() -> bytes:
    return heic() + b"<script>alert(document.domain)</script>\n" * 16


def pdf_nested_arrays(arrays: int, items: int) -> bytes:
    """A catalog holding ``arrays`` arrays of ``items`` zeros each: every array within
    pypdf's per-array limit, the whole costing some 80 bytes of memory per 2 bytes of file
    as pypdf opens the document."""
    row = b"[" + b"0 " * items + b"]"
    return document(catalog=b"/Junk [" + row * arrays + b"]")


def tiff_long_tag(values: int) -> bytes:
    """A one-page TIFF whose StripOffsets tag declares ``values`` LONG values (all present,
    so the file is ``4 * values`` bytes): Pillow reads them into a tuple as it opens it."""
    table = 8 + 2 + 8 * 12 + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    out += struct.pack("<H", 8)
    out += struct.pack("<HHII", 256, 4, 1, 1)  # ImageWidth
    out += struct.pack("<HHII", 257, 4, 1, values)  # ImageLength: one row per strip
    out += struct.pack("<HHIHH", 258, 3, 1, 1, 0)  # BitsPerSample
    out += struct.pack("<HHIHH", 259, 3, 1, 1, 0)  # Compression: none
    out += struct.pack("<HHIHH", 262, 3, 1, 1, 0)  # Photometric: black is zero
    out += struct.pack("<HHII", 273, 4, values, table)  # StripOffsets, out of line
    out += struct.pack("<HHII", 278, 4, 1, 1)  # RowsPerStrip
    out += struct.pack("<HHII", 279, 4, 1, 1)  # StripByteCounts
    out += struct.pack("<I", 0)
    assert len(out) == table
    out += struct.pack("<I", table) * values
    return bytes(out)


def pdf_misplaced_pages(pages: int, misplaced_pages: int, padding: int = 0,
                        junk_kids: int = 0) -> bytes:
    """``pages`` pages, the cross-reference entries of the last ``misplaced_pages`` of them
    pointing at the page before (each is still in the file, where a search finds it);
    ``padding`` bytes of an unused stream make every search longer; ``junk_kids`` numbers
    after the pages in /Kids, which are no pages (pypdf skips them)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", stream_object(b"x" * padding)]
    kids = []
    for _ in range(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>")
        kids.append(b"%d 0 R" % len(objects))
    kids += [b"0"] * junk_kids
    objects[1] = b"<< /Type /Pages /Kids [%b] /Count %d >>" % (b" ".join(kids), pages)
    data = raw_pdf(objects)
    table = data.rindex(b"\nxref\n") + 1
    rows = data[table:].split(b"\n")  # "xref", "0 N", the free entry, then objects 1..
    last = 3 + pages
    for number in range(last - misplaced_pages + 1, last + 1):
        rows[2 + number] = rows[1 + number]
    return data[:table] + b"\n".join(rows)
