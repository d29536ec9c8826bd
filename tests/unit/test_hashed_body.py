"""An upload's body received and hashed piece by piece: ahead on a thread while a core is
free, inline otherwise, always whole, in order, and with no thread left behind."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time

import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from shared.hashed_body import AHEAD_PIECE, HashedBody
from shared.large_uploads import LargeUploads
from shared.request_body import body_reader

KIB = 1024
MIB = 1024 * KIB


class _Bytes:
    """A body from memory, handed out ``step`` bytes at a time at most (as a socket might),
    failing as a reset connection would once ``fail_at`` bytes have gone."""

    def __init__(self, data: bytes, step: int = 100 * KIB, fail_at: int | None = None) -> None:
        self._data = io.BytesIO(data)
        self._step = step
        self._fail_at = fail_at

    def read(self, size: int) -> bytes:
        return self._data.read(min(size, self._step))

    def readinto(self, buffer: memoryview) -> int:
        if self._fail_at is not None and self._data.tell() >= self._fail_at:
            raise ConnectionResetError("the client went away")
        return self._data.readinto(buffer[: self._step])


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "upload-receive"]


def _all(body: HashedBody) -> bytes:
    return b"".join(piece.tobytes() for piece in body.pieces())


def test_a_small_body_is_received_and_hashed_inline() -> None:
    data = os.urandom(300 * KIB)
    uploads = LargeUploads(cores=2)
    body = HashedBody(_Bytes(data), len(data), threshold=MIB, uploads=uploads)
    assert _all(body) == data
    assert body.sha256_hex() == hashlib.sha256(data).hexdigest()
    assert body.received == len(data)
    assert body.pieces_ahead == 0
    assert uploads.in_flight == 0


@pytest.mark.parametrize("cores", [1, 2])
def test_a_large_body_is_received_ahead_only_with_a_core_to_spare(cores: int) -> None:
    data = os.urandom(9 * MIB + 123)
    uploads = LargeUploads(cores=cores)
    body = HashedBody(_Bytes(data), len(data), threshold=MIB, uploads=uploads)
    assert _all(body) == data
    assert body.sha256_hex() == hashlib.sha256(data).hexdigest()
    assert body.received == len(data)
    if cores > 1:
        assert body.pieces_ahead >= 7  # the 8 MiB past the threshold, 1 MiB at a time
    else:
        assert body.pieces_ahead == 0
    assert uploads.in_flight == 0
    assert _threads() == []


def test_a_second_large_upload_takes_the_core_back_and_the_rest_comes_inline() -> None:
    data = os.urandom(12 * MIB)
    uploads = LargeUploads(cores=2)
    body = HashedBody(_Bytes(data), len(data), threshold=MIB, uploads=uploads)
    got = bytearray()
    other_arrived = False
    for piece in body.pieces():
        got += piece
        if not other_arrived and len(got) >= 3 * MIB:
            uploads.enter()  # another large upload now has the other core
            other_arrived = True
    assert bytes(got) == data
    assert body.sha256_hex() == hashlib.sha256(data).hexdigest()
    # The thread handed over within the few pieces it had received ahead.
    assert 1 <= body.pieces_ahead <= 2 + 4
    assert _threads() == []
    assert uploads.in_flight == 1  # only the other upload
    uploads.leave()


class _Watched(_Bytes):
    """Counts the reads made once the request has given up (a stalled client's socket
    would hold such a read until it timed out)."""

    given_up = False
    reads_after = 0

    def readinto(self, buffer: memoryview) -> int:
        if self.given_up:
            self.reads_after += 1
        return super().readinto(buffer)


def test_an_abandoned_body_stops_its_thread() -> None:
    data = os.urandom(10 * MIB)
    uploads = LargeUploads(cores=2)
    source = _Watched(data)
    body = HashedBody(source, len(data), threshold=MIB, uploads=uploads)
    pieces = body.pieces()
    taken = 0
    for piece in pieces:
        taken += len(piece)
        if taken >= 3 * MIB:
            break
    time.sleep(0.2)  # the thread fills the ring and waits for a buffer
    source.given_up = True
    pieces.close()  # the writer failed, say: the upload gives up
    assert _threads() == []
    assert source.reads_after == 0
    assert uploads.in_flight == 0
    with pytest.raises(ValueError, match="not been received to its end"):
        body.sha256_hex()


def test_a_receive_error_reaches_the_request_thread() -> None:
    data = os.urandom(8 * MIB)
    uploads = LargeUploads(cores=2)
    body = HashedBody(_Bytes(data, fail_at=5 * MIB), len(data), threshold=MIB,
                      uploads=uploads)
    with pytest.raises(ConnectionResetError, match="went away"):
        _all(body)
    assert _threads() == []
    assert uploads.in_flight == 0


def test_a_gunicorn_body_is_received_ahead_from_its_socket_to_its_length() -> None:
    data = os.urandom(6 * MIB + 5)
    server, client = socket.socketpair()
    sender = threading.Thread(target=client.sendall, args=(data + b"NEXT",))
    sender.start()
    try:
        unreader = SocketUnreader(server)
        environ = EnvironBuilder(method="POST").get_environ()
        environ["wsgi.input"] = Body(LengthReader(unreader, len(data)))
        environ["CONTENT_LENGTH"] = str(len(data))
        body = HashedBody(body_reader(Request(environ)), len(data), threshold=MIB,
                          uploads=LargeUploads(cores=2))
        pieces = [piece.tobytes() for piece in body.pieces()]
        assert b"".join(pieces) == data
        assert max(map(len, pieces)) == AHEAD_PIECE
        assert body.sha256_hex() == hashlib.sha256(data).hexdigest()
        assert unreader.read(4) == b"NEXT"  # the next request is left for gunicorn
    finally:
        sender.join()
        server.close()
        client.close()
