"""Browsing and administering documents: one, a page, patch, delete (crypto-shred), links.

Drivers see only their own documents; anyone else's answers 404, exactly as a document that
does not exist, so ids leak nothing. Agents see and administer all, and what they change is
written to the audit trail."""

from __future__ import annotations

import logging
import re
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from werkzeug.wrappers import Request, Response

from docproc.runtime import Services
from shared.access import authenticate, request_id, require_agent
from shared.blobstore import Area
from shared.documents import Document, Status
from shared.errors import ApiError, bad_request, not_found
from shared.http import json_response, parse_body
from shared.identity import Identity
from shared.ids import is_document_id
from shared.pagination import encode_cursor, newest_first_after, parse_limit, utc_time
from shared.schemas import (
    DocumentPage,
    DocumentPatch,
    DocumentView,
    LinkRequest,
    LinkView,
)
from shared.sealed import SealError, seal, unseal

log = logging.getLogger(__name__)

# A stored link about to expire is replaced rather than handed out.
LINK_REFRESH_MARGIN = timedelta(hours=1)
_STATUSES = {s.value for s in Status}
_FILTERS = ("owner", "status", "media_type", "kind")


def visible(svc: Services, ident: Identity, doc_id: str) -> Document:
    """The document if the caller may see it; 404 alike for absent and not theirs."""
    doc = svc.documents.get(doc_id) if is_document_id(doc_id) else None
    if doc is None or (doc.owner != ident.user_id and not ident.is_agent):
        raise not_found()
    return doc


def view(svc: Services, doc: Document, with_link: bool = True) -> DocumentView:
    out = DocumentView(
        id=doc.id, owner=doc.owner, status=doc.status.value,
        filename=doc.filename, media_type=doc.media_type or doc.declared_type, size=doc.size,
        sha256=doc.sha256, created_at=doc.created_at, kind=doc.kind,  # type: ignore[arg-type]
        tags=doc.tags, note=doc.note, metadata=doc.metadata, deleted_at=doc.deleted_at,
        deleted_by=doc.deleted_by,
    )
    if with_link and doc.status == Status.STORED:
        out.download_url, out.download_url_expires = current_link(svc, doc)
    if doc.reason and doc.status in (Status.REJECTED, Status.FAILED):
        out.reason = doc.reason
    return out


def _json(model: Any, status: int = 200) -> Response:
    # Fields without a value are left out (no download_url until stored, and so on).
    return json_response(model.model_dump(mode="json", exclude_none=True), status)


def current_link(svc: Services, doc: Document) -> tuple[str, datetime]:
    """The stored link while it is comfortably valid and signed as a new one would be (the
    active key, the public URL), else a fresh one, stored in its place."""
    data_key = svc.keys.unwrap(doc.key, {"document_id": doc.id})
    expires = doc.download_url_expires
    if doc.download_url_enc and expires and expires - LINK_REFRESH_MARGIN > datetime.now(UTC):
        with suppress(SealError):
            stored = unseal(data_key, doc.download_url_enc, doc.id.encode()).decode()
            if svc.links.is_current(stored):
                return stored, expires
    link = svc.links.sign(doc.id, svc.settings.link_ttl_seconds)
    expires = datetime.fromtimestamp(link.expires, UTC)
    svc.documents.set_download_url(doc.id, seal(data_key, link.url.encode(), doc.id.encode()),
                                   expires)
    return link.url, expires


def status(svc: Services, request: Request, doc_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    return _json(view(svc, visible(svc, ident, doc_id)))


def browse(svc: Services, request: Request) -> Response:
    ident = authenticate(svc.users, request.headers)
    args = request.args
    limit = parse_limit(args.get("limit"))
    query: dict[str, Any] = newest_first_after(args.get("cursor"), "created_at")
    for name in _FILTERS:
        value = args.get(name)
        if value:
            query[name] = value
    if not ident.is_agent:
        if query.get("owner", ident.user_id) != ident.user_id:
            raise ApiError(403, "forbidden", "drivers can only list their own documents")
        query["owner"] = ident.user_id
    if query.get("status") and query["status"] not in _STATUSES:
        raise bad_request(f"status must be one of {', '.join(sorted(_STATUSES))}",
                          code="invalid_query")
    if "status" not in query:
        query["status"] = {"$ne": Status.DELETED.value}
    created: dict[str, datetime] = {}
    for name, op in (("created_after", "$gte"), ("created_before", "$lt")):
        if args.get(name):
            created[op] = _timestamp(name, args[name])
    if created:
        query.setdefault("$and", []).append({"created_at": created})
    if args.get("q"):
        text = args["q"].casefold()[:100]
        query["filename_folded"] = {"$regex": re.escape(text)}
    docs = svc.documents.page(query, limit + 1)
    # Pages carry no links: each would cost a data-key unwrap (a KMS call in production);
    # GET /v1/documents/{id} or POST .../link gives one when it is wanted.
    items = [view(svc, d, with_link=False) for d in docs[:limit]]
    more = len(docs) > limit
    cursor = encode_cursor(docs[limit - 1].created_at, docs[limit - 1].id) if more else None
    page = DocumentPage(items=items, next_cursor=cursor)
    return json_response({"items": [i.model_dump(mode="json", exclude_none=True)
                                    for i in page.items], "next_cursor": page.next_cursor})


def _timestamp(name: str, raw: str) -> datetime:
    try:
        return utc_time(raw)
    except ValueError:
        raise bad_request(f"{name} must be an ISO 8601 time", code="invalid_query") from None


def patch(svc: Services, request: Request, doc_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    doc = visible(svc, ident, doc_id)
    require_agent(ident)
    body = parse_body(request, DocumentPatch)
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise bad_request("nothing to change: send kind, tags or note", code="invalid_body")
    if doc.status == Status.DELETED:
        raise ApiError(410, "gone", "the document was deleted")
    updated = svc.documents.update(doc.id, changes)
    if updated is None:
        raise ApiError(410, "gone", "the document was deleted")
    svc.audit.record(ident, "document.patch", "document", doc.id, request_id(request.headers),
                     changes=changes)
    return _json(view(svc, updated))


def delete(svc: Services, request: Request, doc_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    doc = visible(svc, ident, doc_id)
    if doc.status == Status.DELETED:
        raise ApiError(410, "gone", "the document was already deleted")
    if not ident.is_agent and doc.status not in (Status.PROCESSING, Status.REJECTED,
                                                 Status.FAILED):
        raise ApiError(403, "forbidden", "a stored document can only be deleted by an agent")
    gone = svc.documents.tombstone(doc.id, ident.user_id)
    if gone is None:
        raise ApiError(410, "gone", "the document was already deleted")
    # The data key is destroyed first, so even a copy of the ciphertext made before the
    # files are removed can never be read again.
    for area in Area:
        svc.blobs.delete(area, doc.id)
    svc.audit.record(ident, "document.delete", "document", doc.id, request_id(request.headers),
                     owner=doc.owner, previous_status=doc.status.value)
    log.info("document %s crypto-shredded by %s", doc.id, ident.user_id)
    return _json(view(svc, gone))


def new_link(svc: Services, request: Request, doc_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    doc = visible(svc, ident, doc_id)
    if doc.status == Status.DELETED:
        raise ApiError(410, "gone", "the document was deleted")
    if doc.status != Status.STORED:
        raise ApiError(409, "not_stored", f"the document is {doc.status.value}")
    body = parse_body(request, LinkRequest, optional=True)
    ttl = svc.settings.link_ttl_seconds
    if body.expires_in is not None:
        if body.expires_in > ttl:
            raise bad_request(f"expires_in may be at most {ttl} seconds", code="invalid_body")
        ttl = body.expires_in
    link = svc.links.sign(doc.id, ttl)
    return _json(LinkView(download_url=link.url,
                          expires_at=datetime.fromtimestamp(link.expires, UTC)), 201)
