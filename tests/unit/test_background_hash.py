"""The upload's SHA-256, hashed on a thread of its own past a threshold."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from shared.background_hash import BackgroundSha256
from shared.large_uploads import LargeUploads

KIB = 1024


def _hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "upload-sha256"]


def test_a_small_body_is_hashed_inline() -> None:
    digest = BackgroundSha256(threshold=64 * KIB)
    data = os.urandom(10 * KIB)
    digest.update(data)
    assert not digest.in_background
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_large_body_is_hashed_in_the_background_in_order_whatever_the_caller_reuses() -> None:
    digest = BackgroundSha256(threshold=64 * KIB, large_uploads=LargeUploads(cores=2))
    expected = hashlib.sha256()
    reused = bytearray(48 * KIB)  # one buffer refilled for every piece, as a reader might
    for _ in range(40):
        reused[:] = os.urandom(len(reused))
        expected.update(reused)
        with memoryview(reused) as view:
            digest.update(view)
    assert digest.in_background
    assert digest.hexdigest() == expected.hexdigest()
    assert digest.hexdigest() == expected.hexdigest()  # asking again gives the same
    assert not any(t.is_alive() for t in _hashing_threads())


def test_nothing_is_added_after_the_digest() -> None:
    digest = BackgroundSha256(threshold=KIB)
    digest.update(os.urandom(4 * KIB))
    digest.hexdigest()
    with pytest.raises(ValueError, match="after hexdigest"):
        digest.update(b"more")


def test_an_abandoned_upload_stops_its_hashing_thread() -> None:
    uploads = LargeUploads(cores=2)
    digest = BackgroundSha256(threshold=KIB, large_uploads=uploads)
    for _ in range(20):
        digest.update(os.urandom(8 * KIB))
    assert digest.in_background
    digest.close()
    assert not any(t.is_alive() for t in _hashing_threads())
    assert uploads.in_flight == 0
    digest.close()  # twice is harmless
    assert uploads.in_flight == 0
    with pytest.raises(ValueError, match="after close"):
        digest.update(b"more")


def _feed(digest: BackgroundSha256, pieces: int, expected: hashlib._Hash) -> None:
    """Feed ``pieces`` random 8 KiB pieces through one reused buffer, and to ``expected``."""
    reused = bytearray(8 * KIB)
    for _ in range(pieces):
        reused[:] = os.urandom(len(reused))
        expected.update(reused)
        digest.update(memoryview(reused))


def test_a_hashing_thread_only_while_a_core_is_free_for_it() -> None:
    uploads = LargeUploads(cores=2)
    first = BackgroundSha256(threshold=16 * KIB, large_uploads=uploads)
    second = BackgroundSha256(threshold=16 * KIB, large_uploads=uploads)
    small = BackgroundSha256(threshold=16 * KIB, large_uploads=uploads)
    first_expected, second_expected, small_expected = (hashlib.sha256() for _ in range(3))
    _feed(first, 10, first_expected)
    assert first.in_background  # one large upload: the other core hashes for it
    _feed(second, 10, second_expected)
    assert not second.in_background  # an upload on each core: each hashes inline
    _feed(first, 1, first_expected)
    assert not first.in_background  # the first gave its core up at its next piece
    assert len(_hashing_threads()) == 0
    _feed(small, 1, small_expected)  # under the threshold: not counted
    assert uploads.in_flight == 2
    assert second.hexdigest() == second_expected.hexdigest()
    assert uploads.in_flight == 1
    _feed(first, 3, first_expected)
    assert first.in_background  # a core is free again
    assert first.hexdigest() == first_expected.hexdigest()
    assert small.hexdigest() == small_expected.hexdigest()
    assert uploads.in_flight == 0
    assert not any(t.is_alive() for t in _hashing_threads())


def test_one_core_hashes_every_upload_inline() -> None:
    digest = BackgroundSha256(threshold=KIB, large_uploads=LargeUploads(cores=1))
    expected = hashlib.sha256()
    _feed(digest, 10, expected)
    assert not digest.in_background
    assert digest.hexdigest() == expected.hexdigest()


def test_whole_bytes_objects_are_hashed_without_a_copy_and_views_of_parts_with_one() -> None:
    from shared.background_hash import _immutable

    data = os.urandom(64 * KIB)
    assert _immutable(data) is data
    with memoryview(data) as raw, raw.cast("B") as view:
        assert _immutable(view) is data  # what EnvelopeWriter hands over
        part = _immutable(view[KIB:])
        assert part == data[KIB:]
        assert part is not data
    buffer = bytearray(data)
    copied = _immutable(buffer)
    buffer[0] ^= 0xFF  # the caller reuses its buffer: the queued piece must not change
    assert copied == data
