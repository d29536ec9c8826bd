"""The blob store: objects where their ids say, whole or not at all, and large ones handed to
the disk as they are written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shared import blobstore
from shared.blobstore import WRITEBACK_BYTES, Area, BlobStore, release_pages
from shared.ids import new_document_id
from tests.page_cache import cache_can_drop, resident_pages

MIB = 1024 * 1024


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (offset, length) of every writeback the store starts."""
    ranges: list[tuple[int, int]] = []
    monkeypatch.setattr(blobstore, "_start_writeback",
                        lambda fd, offset, length: ranges.append((offset, length)))
    return ranges


def test_a_large_object_is_handed_to_the_disk_in_pieces_while_it_is_written(
    tmp_path: Path, started: list[tuple[int, int]],
) -> None:
    store = BlobStore(tmp_path)
    doc_id = new_document_id()
    piece = os.urandom(64 * 1024)
    total = 2 * WRITEBACK_BYTES + 3 * MIB
    with store.writer(Area.STAGING, doc_id) as out:
        for _ in range(total // len(piece)):
            out.write(piece)
    # Contiguous ranges from the start, each at least WRITEBACK_BYTES; the tail is the fsync's.
    assert len(started) == 2
    assert started[0][0] == 0
    assert started[1][0] == sum(started[0])
    assert all(length >= WRITEBACK_BYTES for _, length in started)
    assert sum(started[-1]) <= total
    assert store.path(Area.STAGING, doc_id).read_bytes() == piece * (total // len(piece))


def test_a_small_object_starts_no_writeback(
    tmp_path: Path, started: list[tuple[int, int]],
) -> None:
    store = BlobStore(tmp_path)
    doc_id = new_document_id()
    with store.writer(Area.STAGING, doc_id) as out:
        out.write(b"%PDF-1.7 small")
    assert started == []
    assert store.path(Area.STAGING, doc_id).read_bytes() == b"%PDF-1.7 small"


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    doc_id = new_document_id()

    def cut_short() -> None:
        with store.writer(Area.STAGING, doc_id) as out:
            out.write(os.urandom(WRITEBACK_BYTES + MIB))
            raise RuntimeError("the upload was cut short")

    with pytest.raises(RuntimeError):
        cut_short()
    assert not store.exists(Area.STAGING, doc_id)
    assert list(store.path(Area.STAGING, doc_id).parent.iterdir()) == []


def test_objects_go_where_their_directories_are_made_when_missing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    doc_id, body = new_document_id(), os.urandom(1000)
    with store.writer(Area.STAGING, doc_id) as out:  # its directories do not exist yet
        out.write(body)
    staged = tmp_path / "staging" / doc_id[:2] / doc_id[2:4] / doc_id
    assert store.path(Area.STAGING, doc_id) == staged
    assert staged.read_bytes() == body
    assert store.size(Area.STAGING, doc_id) == 1000
    store.promote(doc_id)  # into directories that do not exist yet either
    assert not store.exists(Area.STAGING, doc_id)
    with store.open(Area.OBJECTS, doc_id) as stored:
        assert stored.read() == body
    store.promote(doc_id)  # again, after success: nothing to do
    assert store.exists(Area.OBJECTS, doc_id)
    with pytest.raises(FileNotFoundError):
        store.promote(new_document_id())  # nothing staged, nothing stored
    assert store.delete(Area.OBJECTS, doc_id)
    assert not store.delete(Area.OBJECTS, doc_id)
    with pytest.raises(ValueError, match="not a generated document id"):
        store.path(Area.OBJECTS, "../../etc/passwd")


def test_a_new_prefix_directory_is_recorded_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fsync of the object's own directory does not make the directories above it
    durable: each one made is fsynced into its parent before the object counts as kept."""
    synced: list[str] = []
    real = blobstore.fsync_dir

    def record(directory: str | Path) -> None:
        synced.append(os.path.relpath(directory, tmp_path))
        real(directory)

    monkeypatch.setattr(blobstore, "fsync_dir", record)
    store = BlobStore(tmp_path)
    doc_id = new_document_id()
    with store.writer(Area.STAGING, doc_id) as out:
        out.write(b"x")
    aa, bb = doc_id[:2], doc_id[2:4]
    assert synced == ["staging", f"staging/{aa}", f"staging/{aa}/{bb}"]
    synced.clear()
    store.promote(doc_id)
    assert synced == ["objects", f"objects/{aa}", f"objects/{aa}/{bb}"]
    synced.clear()
    other = aa + bb + new_document_id()[4:]  # the same prefix: nothing new to record
    with store.writer(Area.STAGING, other) as out:
        out.write(b"y")
    assert synced == [f"staging/{aa}/{bb}"]


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range(2) is Linux's")
def test_linux_writeback_is_the_real_system_call(tmp_path: Path) -> None:
    assert blobstore._start_writeback is not None
    store = BlobStore(tmp_path)
    doc_id = new_document_id()
    data = os.urandom(3 * WRITEBACK_BYTES)
    with store.writer(Area.OBJECTS, doc_id) as out:
        out.write(data)
    assert store.path(Area.OBJECTS, doc_id).read_bytes() == data


def test_releasing_an_objects_pages_keeps_its_bytes(tmp_path: Path) -> None:
    if not cache_can_drop(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem whose pages are the files")
    store = BlobStore(tmp_path)
    doc_id = new_document_id()
    data = os.urandom(4 * MIB)
    with store.writer(Area.OBJECTS, doc_id) as out:
        out.write(data)
    path = store.path(Area.OBJECTS, doc_id)
    with store.open(Area.OBJECTS, doc_id) as source:
        assert source.read() == data
        assert resident_pages(path) > 0  # just written and read: cached
        release_pages(source)
    assert resident_pages(path) == 0
    assert path.read_bytes() == data
