"""Download function: the target of a document's signed link.

Checks the link's signature and expiry, then the caller's right to the document (its owner,
or an agent; anyone else gets 404, which does not reveal that the document exists), and
streams the decrypted bytes chunk by chunk, each authenticated before it is sent. Run alone
with ``functions-framework --source functions/download/main.py --target download``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import quote

import functions_framework
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from docproc.runtime import Services, services
from shared.blobstore import Area
from shared.documents import Status
from shared.envelope import decrypt_stream
from shared.errors import not_found
from shared.http import Endpoint, dispatch
from shared.identity import identity_from_headers
from shared.ids import is_document_id

ROUTES = Map([Rule("/v1/files/<doc_id>", methods=["GET"], endpoint="download")])


def download(svc: Services, request: Request, doc_id: str) -> Response:
    ident = identity_from_headers(request.headers)
    svc.links.verify("GET", request.path, request.args.get("exp"), request.args.get("sig"))
    doc = svc.documents.get(doc_id) if is_document_id(doc_id) else None
    if doc is None or (doc.owner != ident.user_id and not ident.is_agent):
        raise not_found()
    if doc.status != Status.STORED:
        raise not_found("the document is not stored")
    data_key = svc.keys.unwrap(doc.key, {"document_id": doc.id})
    source = svc.blobs.open(Area.OBJECTS, doc.id)
    body = _stream(data_key, source, doc.id.encode())
    response = Response(body, mimetype=doc.media_type, direct_passthrough=True)
    response.content_length = doc.size
    response.headers["Content-Disposition"] = _disposition(doc.filename)
    response.headers["Cache-Control"] = "private, no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["ETag"] = f'"{doc.sha256}"'
    return response


def _stream(key: bytes, source: BinaryIO, aad: bytes) -> Iterator[bytes]:
    # If a chunk fails authentication mid-stream the connection ends short of
    # Content-Length, so the client can tell the download is incomplete.
    with source:
        yield from decrypt_stream(key, source, associated_data=aad)


def _disposition(filename: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_"
                       for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


ENDPOINTS: dict[str, Endpoint] = {"download": download}


def handle(svc: Services, request: Request) -> Response:
    return dispatch(ROUTES, ENDPOINTS, request, svc)


@functions_framework.http
def download_file(request: Request) -> Response:
    return handle(services(), request)
