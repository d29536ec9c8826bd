"""The storage function's examination of a staged object: verification, sniffing and
inspection, for documents small enough to be inspected from the verified plaintext and for
larger ones, which are read a second time through a decrypting view."""

from __future__ import annotations

import io
import random
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, cast

import pytest
from PIL import Image

from docproc.runtime import Services
from functions.storage.main import INSPECT_IN_MEMORY, Verdict, _examine
from shared.blobstore import Area, BlobStore
from shared.config import DEFAULT_ALLOWED_TYPES
from shared.documents import Document, Status, utcnow
from shared.envelope import EnvelopeWriter
from shared.ids import new_document_id
from tests import hostile_samples as hostile
from tests import samples
from tests.page_cache import cache_can_drop, resident_pages

LARGE = INSPECT_IN_MEMORY + 256 * 1024


class CountingBlobStore(BlobStore):
    """The real store, counting how often an object is opened for reading."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened = 0

    def open(self, area: Area, doc_id: str) -> BinaryIO:
        self.opened += 1
        return super().open(area, doc_id)


def _stage(blobs: BlobStore, data: bytes,
           declared_type: str = "application/pdf") -> tuple[Document, bytes]:
    doc_id = new_document_id()
    key = secrets.token_bytes(32)
    with blobs.writer(Area.STAGING, doc_id) as staged:
        writer = EnvelopeWriter(key, staged, associated_data=doc_id.encode())
        writer.write(data)
        writer.close()
    now = utcnow()
    doc = Document(_id=doc_id, owner="driver-1", filename="pod.pdf",
                   declared_type=declared_type, size=len(data), sha256="0" * 64,
                   created_at=now, updated_at=now, wrapped_key={},
                   upload_event_id=new_document_id())
    return doc, key


def _examine_staged(blobs: BlobStore, doc: Document, key: bytes,
                    inspection_memory_mib: int = 256) -> Verdict:
    svc: Any = SimpleNamespace(blobs=blobs, settings=SimpleNamespace(
        allowed_types=DEFAULT_ALLOWED_TYPES, inspection_memory_mib=inspection_memory_mib,
        inspection_seconds=120.0))
    return _examine(cast(Services, svc), doc, Area.STAGING, key)


def _examined(tmp_path: Path, data: bytes) -> tuple[Verdict, int]:
    blobs = CountingBlobStore(tmp_path / "efs")
    doc, key = _stage(blobs, data)
    return _examine_staged(blobs, doc, key), blobs.opened


@pytest.mark.parametrize("padding", [0, LARGE], ids=["in-memory", "read-again"])
def test_a_pdf_is_stored_with_its_page_count(tmp_path: Path, padding: int) -> None:
    verdict, _ = _examined(tmp_path, samples.pdf(b"pod", pages=3, padding=padding))
    assert verdict.status == Status.STORED
    assert verdict.media_type == "application/pdf"
    assert verdict.metadata["pages"] == 3


@pytest.mark.parametrize("padding", [0, LARGE], ids=["in-memory", "read-again"])
def test_active_content_is_rejected_whichever_way_it_is_read(tmp_path: Path,
                                                             padding: int) -> None:
    data = hostile.document(catalog=b"/OpenAction 5 0 R", extra=[
        hostile.JS_ACTION, hostile.stream_object(b"x" * padding)])
    verdict, _ = _examined(tmp_path, data)
    assert verdict.status == Status.REJECTED
    assert verdict.reason == "PDF contains JavaScript"


def test_a_small_document_is_read_once_and_a_large_one_twice(tmp_path: Path) -> None:
    small = samples.pdf(b"pod", padding=INSPECT_IN_MEMORY - 4096)
    assert len(small) <= INSPECT_IN_MEMORY
    _, opened = _examined(tmp_path / "small", small)
    assert opened == 1
    # A large JPEG is read again here; a large PDF or TIFF by a child process (below).
    noise = Image.frombytes("RGB", (1024, 1024), random.Random(7).randbytes(3 * 1024 * 1024))
    out = io.BytesIO()
    noise.save(out, "JPEG", quality=95)
    large = out.getvalue()
    assert len(large) > INSPECT_IN_MEMORY
    blobs = CountingBlobStore(tmp_path / "large")
    doc, key = _stage(blobs, large, "image/jpeg")
    assert _examine_staged(blobs, doc, key).status == Status.STORED
    assert blobs.opened == 2


def test_a_large_tiff_exhausting_the_inspection_memory_is_rejected(tmp_path: Path) -> None:
    """In this process it was stored, after holding some 300 MiB (Pillow reading a tag of
    a million values): a few such uploads at once took the pod past its memory limit."""
    blobs = CountingBlobStore(tmp_path / "efs")
    doc, key = _stage(blobs, hostile.tiff_long_tag(1_000_000), "image/tiff")
    verdict = _examine_staged(blobs, doc, key, inspection_memory_mib=64)
    assert verdict.status == Status.REJECTED
    assert verdict.reason is not None
    assert "memory" in verdict.reason
    assert blobs.opened == 1  # the child read it the second time


def test_a_tampered_object_fails_before_any_inspection(tmp_path: Path) -> None:
    blobs = CountingBlobStore(tmp_path / "efs")
    doc, key = _stage(blobs, samples.pdf(b"pod"))
    path = blobs.path(Area.STAGING, doc.id)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x01  # inside the final chunk's ciphertext
    path.write_bytes(bytes(raw))
    verdict = _examine_staged(blobs, doc, key)
    assert verdict.status == Status.FAILED
    assert verdict.reason is not None
    assert "integrity" in verdict.reason
    assert blobs.opened == 1


@pytest.mark.parametrize("padding", [0, LARGE], ids=["in-memory", "read-again"])
def test_the_examined_object_leaves_the_page_cache(tmp_path: Path, padding: int) -> None:
    """Its last read drops its pages: nothing reads a new object again for hours."""
    if not cache_can_drop(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem whose pages are the files")
    blobs = BlobStore(tmp_path / "efs")
    data = samples.pdf(samples.marker(), padding=padding)
    doc, key = _stage(blobs, data)
    path = blobs.path(Area.STAGING, doc.id)
    assert resident_pages(path) > 0  # just written: cached
    assert _examine_staged(blobs, doc, key).status == Status.STORED
    assert resident_pages(path) == 0
