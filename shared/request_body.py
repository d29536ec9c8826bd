"""Reading a request body in large pieces, whichever WSGI server delivers it."""

from __future__ import annotations

import os
from collections.abc import Callable

from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader
from werkzeug.wrappers import Request


def body_reader(request: Request, piece: int) -> Callable[[int], bytes]:
    """A ``read(n)`` over the request body.

    gunicorn hands a body to the application 1 KiB at a time, each through three buffers, from
    8 KiB ``recv`` calls: for a 200 MiB upload that bookkeeping was a third of the request's
    CPU time, and even read through its length-delimited reader in large pieces every byte
    is copied twice more on its way (into a ``BytesIO`` and out again). So a body nobody has
    read yet comes straight from the socket, one ``recv`` of up to ``n`` bytes per call, never
    past the Content-Length (a keep-alive client's next request stays for gunicorn), after
    whatever gunicorn had already read past the headers; gunicorn's own count of what is left
    is kept in step. Every other server (and a chunked body) goes through the standard WSGI
    stream, which is bounded by the Content-Length.
    """
    raw = request.environ.get("wsgi.input")
    if (isinstance(raw, Body) and isinstance(raw.reader, LengthReader)
            and isinstance(raw.reader.unreader, SocketUnreader) and raw.buf.tell() == 0):
        return _socket_reader(raw.reader)
    return request.stream.read


def _socket_reader(reader: LengthReader) -> Callable[[int], bytes]:
    unreader: SocketUnreader = reader.unreader

    def read(size: int) -> bytes:
        size = min(size, reader.length)
        if size <= 0:
            return b""
        data: bytes
        unreader.buf.seek(0, os.SEEK_END)
        if unreader.buf.tell():  # read with the headers, or put back by a read before
            early: bytes = unreader.read()
            data, rest = early[:size], early[size:]
            unreader.unread(rest)
        else:
            data = unreader.sock.recv(size)  # b"" when the client went away
        reader.length -= len(data)
        return data

    return read
