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
