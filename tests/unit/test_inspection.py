"""Inspection of uploaded documents against hostile content: bombs, polyglots, active PDFs.

Every hostile case has a harmless twin that must still be accepted, so the checks are shown
to reject the attack and not merely everything that looks a bit like it.
"""

from __future__ import annotations

import io
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import pytest
from PIL import Image, ImageFile
from pypdf.filters import FlateDecode

from shared.inspection import (
    MAX_IMAGE_PIXELS,
    SNIFF_BYTES,
    InvalidDocument,
    extract_metadata,
    sniff,
)
from shared.inspection import pdf as inspection_pdf
from tests import hostile_samples as hostile
from tests import samples

PDF = "application/pdf"
JPEG = "image/jpeg"
PNG = "image/png"
TIFF = "image/tiff"
HEIC = "image/heic"

POLYGLOT = "file is valid as more than one type (polyglot)"
TRAILING = "unexpected data after the end of the image"
JAVASCRIPT = "PDF contains JavaScript"
LAUNCH = "PDF launches external programs"
EMBEDDED = "PDF has embedded files"
XFA = "PDF contains an XFA form"
RICH_MEDIA = "PDF contains rich media (Flash, video or 3D)"
ENCRYPTED = "encrypted PDF cannot be inspected"
TOO_COMPLEX = "PDF is too complex to inspect"
UNSUPPORTED = "PDF uses a feature that cannot be inspected"
METADATA_TOO_LARGE = "image metadata is too large"

# The bounds the hostile cases must stay within.
PEAK_BYTES = 50 * 1024 * 1024
SECONDS = 2.0


def _stream(data: bytes) -> BinaryIO:
    # Read-only and seekable, like the decrypting view the storage function passes.
    return io.BufferedReader(io.BytesIO(data))


def inspect(media_type: str, data: bytes) -> dict[str, Any]:
    return extract_metadata(media_type, _stream(data))


def rejection(media_type: str, data: bytes) -> str:
    with pytest.raises(InvalidDocument) as caught:
        inspect(media_type, data)
    return str(caught.value)


@dataclass
class Measured:
    metadata: dict[str, Any] | None
    reason: str | None
    seconds: float
    peak: int


def measured(media_type: str, data: bytes) -> Measured:
    """Inspect, recording the time taken and the peak of Python allocations."""
    stream = _stream(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        metadata, reason = extract_metadata(media_type, stream), None
    except InvalidDocument as exc:
        metadata, reason = None, str(exc)
    finally:
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return Measured(metadata, reason, seconds, peak)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if anything decodes pixels: the bombs must be recognised from headers alone."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture
def flate_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many bytes each FlateDecode call inflated."""
    calls: list[int] = []
    original = FlateDecode.decode

    def spy(*args: Any, **kwargs: Any) -> bytes:
        result = original(*args, **kwargs)
        calls.append(len(result))
        return result

    monkeypatch.setattr(FlateDecode, "decode", staticmethod(spy))
    return calls


# -- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    hostile.zip_archive,
    hostile.zip_bomb,
    lambda: b"PK\x05\x06" + bytes(18),  # an empty archive
    lambda: b"PK\x07\x08" + hostile.zip_archive(),  # spanned-archive marker
], ids=["zip", "zip-bomb", "empty-zip", "spanned-zip"])
def test_archives_are_sniffed_as_zip_never_as_an_accepted_type(make: Callable[[], bytes]) -> None:
    assert sniff(make()[:SNIFF_BYTES]) == "application/zip"


@pytest.mark.parametrize(("make", "media_type"), [
    (samples.pdf, PDF), (hostile.jpeg, JPEG), (hostile.png, PNG), (hostile.tiff, TIFF),
    (hostile.heic, HEIC),
])
def test_accepted_types_are_sniffed(make: Callable[[], bytes], media_type: str) -> None:
    assert sniff(make()[:SNIFF_BYTES]) == media_type


# -- decompression bombs in images ----------------------------------------------------------


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize(("media_type", "make"), [
    (PNG, hostile.png_bomb),
    (JPEG, hostile.jpeg_bomb),
    (TIFF, lambda: hostile.tiff_raw([(50_000, 50_000)])),
], ids=["png", "jpeg", "tiff"])
def test_image_declaring_enormous_dimensions_is_rejected_from_its_header(
    media_type: str, make: Callable[[], bytes],
) -> None:
    result = measured(media_type, make())
    assert result.reason is not None
    assert result.reason.startswith("image too large: "), result.reason
    assert result.seconds < SECONDS
    assert result.peak < PEAK_BYTES


@pytest.mark.usefixtures("no_pixel_decoding")
def test_every_tiff_page_is_held_to_the_pixel_cap() -> None:
    # Pillow only checks the first page when opening; a viewer paging on would decode this.
    data = hostile.tiff_raw([(64, 48), (50_000, 50_000)])
    assert rejection(TIFF, data) == "image too large: 50000x50000 pixels"


@pytest.mark.usefixtures("no_pixel_decoding")
def test_png_whose_image_data_inflates_to_300_mb_is_inspected_in_bounded_memory() -> None:
    data = hostile.png_idat_bomb(10_000, 10_000)  # 100 Mpx: under our cap, over Pillow's
    assert len(data) < 1024 * 1024
    result = measured(PNG, data)
    assert result.metadata == {"width": 10_000, "height": 10_000, "format": "PNG"}
    assert result.peak < PEAK_BYTES
    assert result.seconds < SECONDS


def test_pixel_cap_is_ours_not_pillows() -> None:
    # Just under MAX_IMAGE_PIXELS (but above Pillow's warning level) passes; just over fails.
    side = int(MAX_IMAGE_PIXELS**0.5)
    assert inspect(PNG, hostile.png_bomb(side, side))["width"] == side
    assert rejection(PNG, hostile.png_bomb(side + 1, side + 1)).startswith("image too large")


def test_png_with_compressed_text_inflating_beyond_the_budget_is_rejected() -> None:
    result = measured(PNG, hostile.png_text_bomb())
    assert result.reason == METADATA_TOO_LARGE
    assert result.peak < PEAK_BYTES


# -- polyglots and appended data ------------------------------------------------------------


@pytest.mark.parametrize(("media_type", "make"), [
    (JPEG, hostile.jpeg_with_pdf_header),
    (PNG, hostile.png_with_pdf_header),
    (JPEG, hostile.jpeg_with_appended_zip),
    (PNG, hostile.png_with_appended_zip),
    (TIFF, lambda: hostile.tiff() + hostile.zip_archive()),
    (HEIC, lambda: hostile.heic() + hostile.zip_archive()),
    (PDF, hostile.pdf_with_zip_inside),
    (PDF, lambda: samples.pdf() + hostile.zip_archive()),
], ids=["jpeg+pdf", "png+pdf", "jpeg+zip", "png+zip", "tiff+zip", "heic+zip", "pdf+zip",
        "pdf+appended-zip"])
def test_polyglots_are_rejected(media_type: str, make: Callable[[], bytes]) -> None:
    data = make()
    assert sniff(data[:SNIFF_BYTES]) == media_type  # they do pass for the declared type
    assert rejection(media_type, data) == POLYGLOT


@pytest.mark.parametrize(("media_type", "make"), [
    (JPEG, hostile.jpeg_with_appended_script),
    # Ending the payload with an end-of-image marker fools a look at the tail alone.
    (JPEG, lambda: hostile.jpeg_with_appended_script() + b"\xff\xd9"),
    (JPEG, lambda: hostile.jpeg() + b"Rar!\x1a\x07\x00" + bytes(range(256)) * 16),
    (PNG, hostile.png_with_appended_data),
    (HEIC, hostile.heic_with_appended_script),
], ids=["jpeg+script", "jpeg+script+eoi", "jpeg+rar", "png+7z", "heic+script"])
def test_data_after_the_end_of_an_image_is_rejected(
    media_type: str, make: Callable[[], bytes],
) -> None:
    assert rejection(media_type, make()) == TRAILING


@pytest.mark.parametrize("make", [
    lambda: hostile.jpeg() + b"\r\n",
    hostile.jpeg_with_padding,
    hostile.jpeg_with_samsung_trailer,
    hostile.jpeg_with_secondary_image,
], ids=["newline", "padding", "samsung-trailer", "mpf-secondary-image"])
def test_harmless_bytes_after_a_jpeg_are_tolerated(make: Callable[[], bytes]) -> None:
    assert inspect(JPEG, make())["format"] == "JPEG"


def test_large_jpeg_is_walked_with_flat_memory() -> None:
    img = Image.effect_noise((2400, 1800), 80).convert("RGB")
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    data = out.getvalue()
    assert len(data) > 2 * 1024 * 1024
    result = measured(JPEG, data)
    assert result.metadata == {"width": 2400, "height": 1800, "format": "JPEG"}
    assert result.peak < len(data)  # never the whole file at once


# -- legitimate images ----------------------------------------------------------------------


def test_jpeg_with_exif_is_accepted() -> None:
    data = hostile.jpeg_with_exif()
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif()[0x010F] == "ACME"  # the sample really carries EXIF
    assert inspect(JPEG, data) == {"width": 640, "height": 480, "format": "JPEG"}


@pytest.mark.parametrize(("make", "size"), [
    (hostile.jpeg_with_exif_thumbnail, (320, 240)),  # a whole JPEG, EOI included, in APP1
    (hostile.jpeg_progressive, (256, 192)),
    (hostile.jpeg_with_restart_markers, (256, 192)),
    (lambda: samples.jpeg(samples.marker()), (64, 48)),
], ids=["exif-thumbnail", "progressive", "restart-markers", "comment"])
def test_jpeg_variants_are_accepted(make: Callable[[], bytes], size: tuple[int, int]) -> None:
    assert inspect(JPEG, make()) == {"width": size[0], "height": size[1], "format": "JPEG"}


def test_png_is_accepted() -> None:
    assert inspect(PNG, hostile.png((64, 48))) == {"width": 64, "height": 48, "format": "PNG"}


def test_multi_page_tiff_reports_its_pages() -> None:
    assert inspect(TIFF, hostile.tiff(pages=3)) == {
        "width": 64, "height": 48, "format": "TIFF", "pages": 3}
    assert inspect(TIFF, hostile.tiff(pages=1))["pages"] == 1


@pytest.mark.parametrize("failure", [MemoryError, OverflowError])
def test_an_image_that_exhausts_memory_or_overflows_is_refused_not_retried(
    monkeypatch: pytest.MonkeyPatch, failure: type[Exception],
) -> None:
    def fails(*_args: Any, **_kwargs: Any) -> Any:
        raise failure("as Pillow raises it for a TIFF tag of ten million values")

    monkeypatch.setattr(Image, "open", fails)
    with pytest.raises(InvalidDocument):
        inspect(TIFF, hostile.tiff(pages=1))


@pytest.mark.parametrize("meta_last", [False, True], ids=["meta-first", "media-data-first"])
def test_heic_structure_is_accepted(meta_last: bool) -> None:
    assert inspect(HEIC, hostile.heic(meta_last=meta_last)) == {"width": 4032, "height": 3024}


@pytest.mark.parametrize(("data", "reason"), [
    (hostile.heic(meta=False), "corrupt image: HEIC has no image metadata (meta box)"),
    (hostile.heic(size=None), "corrupt image: HEIC declares no image size (ispe)"),
    (hostile.heic(media_data=False), "corrupt image: HEIC has no image data (mdat or idat box)"),
    (hostile.heic((100_000, 100_000)), "image too large: 100000x100000 pixels"),
], ids=["ftyp-only", "no-size", "no-data", "pixel-bomb"])
def test_heic_without_an_image_or_beyond_the_pixel_cap_is_rejected(data: bytes,
                                                                   reason: str) -> None:
    # There is no HEIC decoder here: what the file declares is all there is to hold it to.
    assert rejection(HEIC, data) == reason


@pytest.mark.parametrize(("media_type", "data"), [
    (JPEG, samples.jpeg()[:200]),
    (JPEG, samples.jpeg()[:-2]),  # no end-of-image marker
    (PNG, hostile.png_with_bad_crc()),
    (PNG, hostile.png()[:-12]),  # no IEND
], ids=["jpeg-cut-in-header", "jpeg-without-eoi", "png-bad-crc", "png-without-iend"])
def test_broken_images_are_reported_as_corrupt(media_type: str, data: bytes) -> None:
    assert rejection(media_type, data).startswith("corrupt image: ")


# -- PDF: active content --------------------------------------------------------------------


@pytest.mark.parametrize(("make", "reason"), [
    (hostile.pdf_open_action, JAVASCRIPT),
    (hostile.pdf_js_after_harmless_action, JAVASCRIPT),
    (hostile.pdf_obfuscated_javascript, JAVASCRIPT),
    (hostile.pdf_names_javascript, JAVASCRIPT),
    (hostile.pdf_page_additional_action, JAVASCRIPT),
    (hostile.pdf_outline, JAVASCRIPT),
    (lambda: hostile.pdf_form(b"/AA << /K 6 0 R >>"), JAVASCRIPT),
    (lambda: hostile.pdf_link(b"  JavaScript:alert(1)"), JAVASCRIPT),
    (lambda: hostile.pdf_incremental_update(javascript=True), JAVASCRIPT),
    (lambda: hostile.pdf_object_streams(catalog=b"/OpenAction 5 0 R",
                                        extra=[b"<< /S /Java#53cript /JS (x) >>"]), JAVASCRIPT),
    (lambda: hostile.pdf_encrypted(hostile.pdf_open_action(), ""), JAVASCRIPT),
    (hostile.pdf_launch, LAUNCH),
    (hostile.pdf_embedded_file, EMBEDDED),
    (hostile.pdf_file_attachment_annotation, EMBEDDED),
    (lambda: hostile.document(catalog=b"/AF [5 0 R]", extra=[
        b"<< /Type /Filespec /F (data.xml) /EF << /F 6 0 R >> >>",
        hostile.stream_object(b"<xml/>", b"/Type /EmbeddedFile")]), EMBEDDED),
    (hostile.pdf_rich_media, RICH_MEDIA),
    (hostile.pdf_xfa, XFA),
], ids=["open-action", "next-chain", "name-escaped", "names-tree", "page-aa", "bookmark",
        "field-aa", "javascript-uri", "incremental-update", "object-stream",
        "owner-password-only", "launch", "embedded-files", "file-attachment",
        "associated-file", "rich-media", "xfa"])
def test_pdf_with_active_content_is_rejected(make: Callable[[], bytes], reason: str) -> None:
    data = make()
    assert sniff(data[:SNIFF_BYTES]) == PDF
    assert rejection(PDF, data) == reason


@pytest.mark.parametrize(("make", "pages"), [
    (lambda: hostile.pdf_open_action(hostile.URI_ACTION), 1),  # same structure, no JS
    (hostile.pdf_link, 1),
    (hostile.pdf_form, 1),
    (lambda: hostile.pdf_outline(hostile.URI_ACTION), 1),
    (hostile.pdf_outline_loop, 1),
    (hostile.pdf_empty_embedded_files, 1),
    (lambda: hostile.pdf_incremental_update(javascript=False), 2),
    (hostile.pdf_linearized, 2),
    (lambda: hostile.pdf_object_streams(catalog=b"/OpenAction 5 0 R",
                                        extra=[hostile.URI_ACTION]), 1),
    (hostile.pdf_from_pypdf, 2),
    (lambda: samples.pdf(samples.marker(), pages=3), 3),
], ids=["open-action-uri", "link", "form", "bookmark", "bookmark-loop", "empty-attachments",
        "incremental-update", "linearized", "object-streams", "pypdf", "samples"])
def test_harmless_pdfs_are_accepted(make: Callable[[], bytes], pages: int) -> None:
    assert inspect(PDF, make()) == {"pages": pages}


# -- PDF: walks a hostile structure cannot trick or stall --------------------------------


@pytest.mark.parametrize(("make", "reason"), [
    (hostile.pdf_shared_name_launch, LAUNCH),
    (hostile.pdf_shared_name_attachment, EMBEDDED),
    (lambda: hostile.pdf_repeated_page(3, 2, hostile.JS_ACTION), JAVASCRIPT),
], ids=["launch-name-shared", "attachment-name-shared", "repeated-page-javascript"])
def test_active_content_behind_shared_objects_is_found(make: Callable[[], bytes],
                                                        reason: str) -> None:
    assert rejection(PDF, make()) == reason


@pytest.fixture
def whole_file_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each time pypdf reads the whole file to search it for an object the cross-reference
    table does not place (hours, for a large file and many such references)."""
    import pypdf._reader
    from pypdf._utils import get_stream_data as real

    reads: list[Any] = []

    def counted(stream: Any) -> Any:
        reads.append(stream)
        return real(stream)

    monkeypatch.setattr(pypdf._reader, "get_stream_data", counted)
    return reads


def test_active_content_the_table_misplaces_is_found_as_a_viewer_would(
    whole_file_reads: list[Any],
) -> None:
    # pdf.js and others rebuild a damaged table: taking the object for null would let its
    # JavaScript through.
    data = hostile.misplaced(hostile.pdf_open_action(), 5)
    assert rejection(PDF, data) == JAVASCRIPT
    assert len(whole_file_reads) == 1


def test_an_object_is_searched_for_once_however_often_it_is_referred_to(
    whole_file_reads: list[Any],
) -> None:
    # 200 references to two objects out of place: one found by the search, one not
    assert inspect(PDF, hostile.pdf_misplaced_references(200)) == {"pages": 1}
    assert len(whole_file_reads) == 2


def test_many_objects_outside_the_table_are_refused_after_a_few_searches(
    whole_file_reads: list[Any],
) -> None:
    reason = rejection(PDF, hostile.pdf_dangling_references(100))
    assert reason.startswith(TOO_COMPLEX)
    assert len(whole_file_reads) <= inspection_pdf._PDF_MAX_REPAIRS


def test_pages_the_table_misplaces_are_searched_for_a_few_times_at_most(
    whole_file_reads: list[Any],
) -> None:
    # pypdf's own page-tree walk searched the whole file for each (500 pages in 0.9 MB:
    # 4 s and stored; 15,000 fit in 1 MiB, inspected in process).
    reason = rejection(PDF, hostile.pdf_misplaced_pages(500, 499, padding=100_000))
    assert reason.startswith(TOO_COMPLEX)
    assert len(whole_file_reads) <= inspection_pdf._PDF_MAX_REPAIRS + 1
    whole_file_reads.clear()
    # Entries that are no pages do not hide the pages from the count (they did: the walk
    # stopped at 20,000 entries of any kind and left the pages to pypdf).
    reason = rejection(PDF, hostile.pdf_misplaced_pages(100, 99, junk_kids=20_001))
    assert reason.startswith(TOO_COMPLEX)
    assert len(whole_file_reads) <= inspection_pdf._PDF_MAX_REPAIRS + 1
    assert inspect(PDF, hostile.pdf_misplaced_pages(100, 0, junk_kids=20_001)) == {
        "pages": 100}
    whole_file_reads.clear()
    # A few, as a damaged but real file has, are found as a viewer would find them.
    assert inspect(PDF, hostile.pdf_misplaced_pages(20, 8)) == {"pages": 20}
    assert len(whole_file_reads) <= 2 * 8


def test_a_page_tree_beyond_pypdfs_limit_is_refused_before_pypdf_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inspection_pdf, "_PDF_MAX_PAGE_TREE_ENTRIES", 50)
    assert inspect(PDF, hostile.pdf_pages(50)) == {"pages": 50}
    assert rejection(PDF, hostile.pdf_pages(51)).startswith(TOO_COMPLEX)


def test_a_form_in_a_large_object_stream_is_decoded_once(flate_calls: list[int]) -> None:
    """One read from an object stream caches all its objects: letting go of pypdf's cache
    by their number decoded the stream again at every later read (a 10 KB form with 300
    fields took 12 s)."""
    assert inspect(PDF, hostile.pdf_form_in_object_stream(1_100, 300)) == {"pages": 1}
    object_stream = max(flate_calls)
    assert flate_calls.count(object_stream) <= 2, flate_calls


def test_a_page_listed_many_times_is_walked_once_and_inline_items_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inspection_pdf, "_PDF_WALK_BUDGET", 5_000)
    # 2,000 copies of a page with 150 inline links: walked once, accepted (each copy walked
    # would be 300,000 links).
    assert inspect(PDF, hostile.pdf_repeated_page(2_000, 150)) == {"pages": 2_000}
    # Inline links cost no read but are looked at: beyond the budget, refused.
    assert rejection(PDF, hostile.pdf_repeated_page(1, 6_000)).startswith(TOO_COMPLEX)


def test_a_cross_reference_stream_is_held_to_a_real_documents_size() -> None:
    # pypdf's own limit is 2 million entries, some 300 MiB of tables from a 30 KB file.
    assert inspect(PDF, hostile.pdf_xref_stream(50_000)) == {"pages": 1}
    reason = rejection(PDF, hostile.pdf_xref_stream(150_000))
    assert "entry limit reached: 150000 > 100000" in reason


def test_object_streams_pointed_into_are_decoded_within_a_budget() -> None:
    """pypdf decodes a whole object stream to read one object of it, and keeps it: an open
    action with one object in each of many 12 MiB streams held hundreds of MiB."""
    assert inspect(PDF, hostile.pdf_object_stream_bomb(2)) == {"pages": 1}  # 24 MiB: fine
    result = measured(PDF, hostile.pdf_object_stream_bomb(8))
    assert result.reason is not None
    assert result.reason.startswith(f"{TOO_COMPLEX}: its object streams decode to more than")
    assert result.peak < 3 * inspection_pdf._PDF_MAX_DECODED, result.peak


def test_an_offset_too_large_for_the_file_is_corrupt_not_a_crash() -> None:
    # Storage inspects a small document from memory (functions/storage/main.py), where
    # seeking that far overflows instead of failing to read.
    with pytest.raises(InvalidDocument, match=r"^corrupt PDF"):
        extract_metadata(PDF, io.BytesIO(hostile.pdf_startxref_overflow()))


# -- PDF: encryption ------------------------------------------------------------------------


def test_pdf_needing_a_password_cannot_be_inspected_and_is_rejected() -> None:
    data = hostile.pdf_encrypted(hostile.document(), user_password="s3cret")
    assert rejection(PDF, data) == ENCRYPTED


def test_pdf_with_only_an_owner_password_is_inspected_and_accepted() -> None:
    data = hostile.pdf_encrypted(hostile.document(), user_password="")
    assert inspect(PDF, data) == {"encrypted": True, "pages": 1}


def test_pdf_with_an_encryption_scheme_pypdf_lacks_is_rejected() -> None:
    data = hostile.pdf_encrypted(hostile.document(), user_password="")
    data = data.replace(b"/Filter /Standard", b"/Filter /FOPN#5Ffoweb")  # a custom handler
    assert rejection(PDF, data).startswith(UNSUPPORTED)


# -- PDF: size of the structure -------------------------------------------------------------


def test_pdf_with_more_pages_than_the_page_tree_limit_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inspection_pdf, "_PDF_MAX_PAGE_TREE_ENTRIES", 50)
    # The limits are read into pypdf's configuration once, at import.
    monkeypatch.setattr(inspection_pdf, "_LIMITED", inspection_pdf._limited_configuration())
    assert inspect(PDF, hostile.pdf_pages(50)) == {"pages": 50}
    assert rejection(PDF, hostile.pdf_pages(60)).startswith(TOO_COMPLEX)


def test_pdf_needing_more_reads_than_the_walk_budget_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inspection_pdf, "_PDF_WALK_BUDGET", 100)  # the page tree counts too
    assert inspect(PDF, hostile.pdf_pages(10, links_per_page=3)) == {"pages": 10}
    assert rejection(PDF, hostile.pdf_pages(10, links_per_page=20)).startswith(TOO_COMPLEX)


def test_annotations_walked_do_not_accumulate_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inspection_pdf, "_PDF_WALK_CACHED", 100)
    few = measured(PDF, hostile.pdf_pages(200, links_per_page=1))
    many = measured(PDF, hostile.pdf_pages(200, links_per_page=20))
    assert few.metadata == many.metadata == {"pages": 200}
    # Parsed, an annotation takes about 3.5 KB, so keeping the 3,800 extra ones would add
    # some 13 MB; kept only as references in the pages' /Annots arrays, well under 1 MB. The
    # bound leaves room for other threads of a full test run allocating meanwhile.
    assert many.peak - few.peak < 7 * 1024 * 1024


# -- PDF: decompression bombs ---------------------------------------------------------------


def test_pdf_content_stream_inflating_to_1_gib_is_never_inflated(flate_calls: list[int]) -> None:
    data = hostile.pdf_content_bomb(hostile.GIB)
    assert len(data) < 2 * 1024 * 1024
    result = measured(PDF, data)
    assert result.metadata == {"pages": 1}
    assert flate_calls == []  # counting pages decoded no stream at all
    assert result.peak < PEAK_BYTES
    assert result.seconds < SECONDS


def test_pdf_object_stream_inflating_to_1_gib_is_cut_short_and_rejected() -> None:
    # Object streams hold the structure itself, so they must be inflated; only so far.
    data = hostile.pdf_object_streams(zero_padding=hostile.GIB)
    result = measured(PDF, data)
    assert result.reason is not None
    assert result.reason.startswith(TOO_COMPLEX), result.reason
    assert result.peak < PEAK_BYTES
    assert result.seconds < SECONDS


def test_large_pdf_is_inspected_with_flat_memory() -> None:
    data = samples.pdf(pages=2, padding=20 * 1024 * 1024)
    result = measured(PDF, data)
    assert result.metadata == {"pages": 2}
    assert result.peak < 4 * 1024 * 1024


# -- reasons the pipeline already relied on -------------------------------------------------


def test_garbage_after_a_pdf_header_is_a_corrupt_pdf() -> None:
    assert rejection(PDF, b"%PDF-1.7\n" + b"garbage " * 200).startswith("corrupt PDF: ")


def test_types_outside_the_allow_list_are_not_inspected() -> None:
    assert inspect("application/octet-stream", b"\x00" * 64) == {}
