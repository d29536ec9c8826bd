"""Upload bodies read in large pieces from gunicorn, within the Content-Length, as sent."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator

import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from shared.request_body import BodyReader, body_reader

PIECE = 256 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _request(body: object, length: int) -> Request:
    environ = EnvironBuilder(method="POST").get_environ()
    environ["wsgi.input"] = body
    environ["CONTENT_LENGTH"] = str(length)
    return Request(environ)


def _send_then_close(sock: socket.socket, data: bytes, close: bool) -> threading.Thread:
    def send() -> None:
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_gunicorn_bodies_come_whole_in_large_pieces_and_stop_at_their_length(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
    following = b"GET /next HTTP/1.1\r\n\r\n"  # a keep-alive client's next request
    sender = _send_then_close(client, body + following, close=False)
    unreader = SocketUnreader(server)
    read = body_reader(_request(Body(LengthReader(unreader, len(body))), len(body))).read
    pieces = []
    while piece := read(PIECE):
        pieces.append(piece)
    sender.join()
    assert b"".join(pieces) == body
    assert max(map(len, pieces)) > 8 * 1024  # not gunicorn's 8 KiB receive size any more
    # Nothing past the body was consumed: the next request is still there for gunicorn.
    assert unreader.read(len(following)) == following


def test_a_gunicorn_body_cut_short_ends_early(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    sender = _send_then_close(client, b"x" * 20000, close=True)
    read = body_reader(_request(Body(LengthReader(SocketUnreader(server), 60000)), 60000)).read
    got = b""
    while piece := read(PIECE):
        got += piece
    sender.join()
    assert got == b"x" * 20000  # the caller sees fewer bytes than the Content-Length


def test_other_servers_go_through_the_bounded_wsgi_stream() -> None:
    read = body_reader(_request(io.BytesIO(b"abcdef" + b"not the body"), 6)).read
    assert read(PIECE) == b"abcdef"
    assert read(PIECE) == b""
    body = body_reader(_request(io.BytesIO(b"abcdef" + b"not the body"), 6))
    buffer = memoryview(bytearray(4))
    assert body.readinto(buffer) == 4
    assert buffer.tobytes() == b"abcd"
    assert body.readinto(buffer) == 2
    assert buffer[:2].tobytes() == b"ef"
    assert body.readinto(buffer) == 0


def test_what_gunicorn_read_with_the_headers_comes_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    body = b"early-" * 1000 + bytes(range(256)) * 2048  # 6,000 read with the headers
    sender = _send_then_close(client, body[6000:] + b"NEXT", close=False)
    unreader = SocketUnreader(server)
    unreader.unread(body[:6000])
    reader = LengthReader(unreader, len(body))
    read = body_reader(_request(Body(reader), len(body))).read  # 4 KiB: less than waits
    got = b""
    while piece := read(4096):
        assert len(piece) <= 4096
        got += piece
    sender.join()
    assert got == body
    assert reader.length == 0  # gunicorn knows the body was read to the end
    assert unreader.read(4) == b"NEXT"


def _read_into(body: BodyReader, size: int) -> list[bytes]:
    """Every piece ``readinto`` gives, each through the same buffer of ``size`` bytes."""
    buffer = memoryview(bytearray(size))
    pieces = []
    while count := body.readinto(buffer):
        pieces.append(buffer[:count].tobytes())
    return pieces


def test_gunicorn_bodies_can_be_received_into_one_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    body = b"early-" * 1000 + bytes(range(256)) * 4096 + b"tail"
    sender = _send_then_close(client, body[6000:] + b"NEXT", close=False)
    unreader = SocketUnreader(server)
    unreader.unread(body[:6000])  # read with the headers
    reader = LengthReader(unreader, len(body))
    pieces = _read_into(body_reader(_request(Body(reader), len(body))), PIECE)
    sender.join()
    assert b"".join(pieces) == body
    assert pieces[0] == body[:6000]  # what gunicorn held comes first
    assert max(map(len, pieces)) > 8 * 1024
    assert reader.length == 0
    assert unreader.read(4) == b"NEXT"  # nothing past the body was taken


def test_a_gunicorn_body_cut_short_ends_early_into_a_buffer_too(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    sender = _send_then_close(client, b"x" * 20000, close=True)
    body = body_reader(_request(Body(LengthReader(SocketUnreader(server), 60000)), 60000))
    pieces = _read_into(body, PIECE)
    sender.join()
    assert b"".join(pieces) == b"x" * 20000
