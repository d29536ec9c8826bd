"""The upload's SHA-256, hashed on a thread of its own past a threshold."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from shared.background_hash import BackgroundSha256

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
    digest = BackgroundSha256(threshold=64 * KIB)
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
    digest = BackgroundSha256(threshold=KIB)
    for _ in range(20):
        digest.update(os.urandom(8 * KIB))
    assert digest.in_background
    digest.close()
    assert not any(t.is_alive() for t in _hashing_threads())
    digest.close()  # twice is harmless


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
