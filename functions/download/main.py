"""Download function: the target of a document's signed link.

Checks the link's signature, expiry and signing key, then the caller's right to the document
(its owner, or an agent; anyone else gets 404, which does not reveal that it exists), and
streams the decrypted bytes chunk by chunk, each authenticated before it is sent. Single
byte ranges and conditional requests follow RFC 9110, served from the same decrypted stream.
Run alone with ``functions-framework --source functions/download/main.py --target download_file``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import quote

import functions_framework
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from docproc.health import function_request, http_function
from docproc.runtime import Services
from shared.access import authenticate, request_id
from shared.blobstore import Area
from shared.documents import Document, Status
from shared.envelope import EnvelopeReader, decrypt_stream
from shared.errors import ApiError, not_found
from shared.http import Endpoint
from shared.ids import is_document_id

ROUTES = Map([Rule("/v1/files/<doc_id>", methods=["GET"], endpoint="download")])
PIECE = 64 * 1024


def download(svc: Services, request: Request, doc_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    args = request.args
    svc.links.verify("GET", request.path, args.get("exp"), args.get("sig"), args.get("kid"))
    doc = svc.documents.get(doc_id) if is_document_id(doc_id) else None
    if doc is None or (doc.owner != ident.user_id and not ident.is_agent):
        raise not_found()
    if doc.status == Status.DELETED:
        raise ApiError(410, "gone", "the document was deleted")
    if doc.status != Status.STORED:
        raise not_found("the document is not stored")
    etag = doc.sha256
    headers = {
        "ETag": f'"{etag}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-store",
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": _disposition(doc.filename),
    }
    if request.if_none_match.contains_weak(etag):
        return Response(status=304, headers=headers)
    if ident.is_agent and doc.owner != ident.user_id:
        svc.audit.record(ident, "document.download", "document", doc.id,
                         request_id(request.headers), owner=doc.owner)
    byte_range = _wanted_range(request, etag, doc.size)
    data_key = svc.keys.unwrap(doc.key, {"document_id": doc.id})
    source = svc.blobs.open(Area.OBJECTS, doc.id)
    if byte_range is None:
        body = _stream(data_key, source, doc)
        response = Response(body, status=200, mimetype=doc.media_type, headers=headers,
                            direct_passthrough=True)
        response.content_length = doc.size
        return response
    start, stop = byte_range
    response = Response(_stream_range(data_key, source, doc, start, stop), status=206,
                        mimetype=doc.media_type, headers=headers, direct_passthrough=True)
    response.content_length = stop - start
    response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{doc.size}"
    return response


def _wanted_range(request: Request, etag: str, size: int) -> tuple[int, int] | None:
    """The one range to send, or None for the whole document (RFC 9110 §14)."""
    rng = request.range
    if rng is None or rng.units != "bytes":
        return None
    if_range = request.if_range
    if if_range.date is not None or (if_range.etag is not None and if_range.etag != etag):
        # A stale If-Range validator (or a date, as no Last-Modified is sent) means "send
        # it all"; only an exact (strong) ETag match keeps the range.
        return None
    if len(rng.ranges) != 1:
        return None  # several ranges: the server may answer with the whole representation
    bounds = rng.range_for_length(size)
    if bounds is None:
        raise ApiError(416, "range_not_satisfiable", f"the document has {size} bytes",
                       {"Content-Range": f"bytes */{size}"})
    return bounds


def _stream(key: bytes, source: BinaryIO, doc: Document) -> Iterator[bytes]:
    # If a chunk fails authentication mid-stream the connection ends short of
    # Content-Length, so the client can tell the download is incomplete.
    with source:
        yield from decrypt_stream(key, source, associated_data=doc.id.encode())


def _stream_range(key: bytes, source: BinaryIO, doc: Document, start: int,
                  stop: int) -> Iterator[bytes]:
    with source, io.BufferedReader(EnvelopeReader(key, source, associated_data=doc.id.encode()),
                                   buffer_size=PIECE) as plain:
        plain.seek(start)
        left = stop - start
        while left:
            piece = plain.read(min(PIECE, left))
            if not piece:
                break
            left -= len(piece)
            yield piece


def _disposition(filename: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_"
                       for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


ENDPOINTS: dict[str, Endpoint] = {"download": download}


handle = http_function(ROUTES, ENDPOINTS)


@functions_framework.http
def download_file(request: Request) -> Response:
    return function_request(handle, request)
