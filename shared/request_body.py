"""Reading a request body in large pieces, whichever WSGI server delivers it."""

from __future__ import annotations

import os
from typing import Protocol

from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.wrappers import Request


class BodyReader(Protocol):
    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes as a new object; b"" at the end (or when the client left)."""

    def readinto(self, buffer: memoryview, /) -> int:
        """Up to ``len(buffer)`` bytes into ``buffer``; 0 at the end."""


class _WsgiBody:
    """The standard WSGI stream, which every server (and a chunked body) bounds by the
    Content-Length."""

    def __init__(self, request: Request) -> None:
        self._stream = request.stream

    def read(self, size: int) -> bytes:
        return self._stream.read(size)

    def readinto(self, buffer: memoryview) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _GunicornBody:
    """gunicorn hands a body to the application 1 KiB at a time, each through three buffers,
    from 8 KiB ``recv`` calls: for a 200 MiB upload that bookkeeping was a third of the
    request's CPU time, and even read through its length-delimited reader in large pieces
    every byte is copied twice more on its way (into a ``BytesIO`` and out again). So a body
    nobody has read yet comes straight from the socket, one ``recv`` of up to ``n`` bytes per
    call (or one ``recv_into`` the caller's buffer), never past the Content-Length (a
    keep-alive client's next request stays for gunicorn), after whatever gunicorn had already
    read past the headers; gunicorn's own count of what is left is kept in step."""

    def __init__(self, reader: LengthReader) -> None:
        self._reader = reader
        self._unreader: SocketUnreader = reader.unreader

    def _early(self, size: int) -> bytes:
        """Up to ``size`` bytes gunicorn read with the headers (or a read put back)."""
        buffered = self._unreader.buf
        buffered.seek(0, os.SEEK_END)
        if not buffered.tell():
            return b""
        early: bytes = self._unreader.read()
        data, rest = early[:size], early[size:]
        self._unreader.unread(rest)
        return data

    def read(self, size: int) -> bytes:
        size = min(size, self._reader.length)
        if size <= 0:
            return b""
        data = self._early(size) or self._unreader.sock.recv(size)  # b"": the client left
        self._reader.length -= len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        size = min(len(buffer), self._reader.length)
        if size <= 0:
            return 0
        early = self._early(size)
        if early:
            count = len(early)
            buffer[:count] = early
        else:
            count = self._unreader.sock.recv_into(buffer, size)  # 0: the client left
        self._reader.length -= count
        return count


def body_reader(request: Request) -> BodyReader:
    """The fastest reader of ``request``'s body that this server allows."""
    raw = request.environ.get("wsgi.input")
    if (isinstance(raw, Body) and isinstance(raw.reader, LengthReader)
            and isinstance(raw.reader.unreader, SocketUnreader) and raw.buf.tell() == 0):
        return _GunicornBody(raw.reader)
    return _WsgiBody(request)
