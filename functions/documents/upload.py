"""``POST /v1/documents``: stream the body into an encrypted staging object (the claim check),
record the document as `processing`, publish ``document.uploaded``, answer 202."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pymongo.errors import ServerSelectionTimeoutError
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget, ValueTarget
from streaming_form_data.validators import MaxSizeValidator, ValidationError
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wrappers import Request, Response

from docproc.outbox import outbox_event, publish_recorded
from docproc.runtime import Services
from events.catalog import DOCUMENT_UPLOADED, DocumentUploaded
from events.cloudevent import make_event
from shared.access import authenticate
from shared.background_hash import BackgroundSha256
from shared.blobstore import Area
from shared.documents import (
    KINDS,
    Document,
    DuplicateContent,
    DuplicateIdempotencyKey,
    Status,
    utcnow,
)
from shared.envelope import EnvelopeWriter
from shared.errors import ApiError, bad_request
from shared.filenames import clean_filename
from shared.hashed_body import HashedBody
from shared.http import json_response
from shared.ids import new_document_id
from shared.inspection import normalize_media_type
from shared.observability import UPLOAD_BYTES, UPLOADS, log_context
from shared.request_body import body_reader
from shared.schemas import Accepted

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
MAX_IDEMPOTENCY_KEY = 255
# What a multipart body may carry beyond the document: delimiters, part headers, the kind.
MULTIPART_FRAMING = 64 * 1024


class _TooLarge(Exception):
    pass


class _Sink:
    """Counts plaintext into the encryptor and stops at the configured limit."""

    def __init__(self, writer: EnvelopeWriter, limit: int) -> None:
        self.writer = writer
        self.limit = limit

    def write(self, data: bytes | memoryview) -> None:
        if self.writer.plaintext_size + len(data) > self.limit:
            raise _TooLarge
        self.writer.write(data)


class _FilePart(BaseTarget):  # type: ignore[misc]
    """Feeds the multipart `file` part straight into the encryptor, never to a temp file."""

    def __init__(self, sink: _Sink, allowed: tuple[str, ...]) -> None:
        super().__init__()
        self.sink = sink
        self.allowed = allowed
        self.seen = False
        # The parser holds a part's last bytes back until it knows they are not the next
        # delimiter, and says nothing when the body ends without one: only a part that
        # finished arrived whole.
        self.finished = False
        self.media_type: str | None = None

    def on_start(self) -> None:
        if self.seen:
            raise bad_request("send exactly one `file` part")
        self.seen = True

    def on_finish(self) -> None:
        self.finished = True

    def check_type(self) -> str:
        # The parser learns the part's Content-Type after on_start, so check on first data.
        if self.media_type is None:
            declared = normalize_media_type(self.multipart_content_type or "")
            self.media_type = _check_type(declared, self.allowed)
        return self.media_type

    def on_data_received(self, chunk: bytes) -> None:
        self.check_type()
        self.sink.write(chunk)


class _KindField(ValueTarget):  # type: ignore[misc]
    """The multipart `kind` field, kept in memory, so no longer than a kind can be."""

    def __init__(self) -> None:
        super().__init__(validator=MaxSizeValidator(max(map(len, KINDS))))
        self.started = self.finished = False

    def on_start(self) -> None:
        self.started = True

    def on_finish(self) -> None:
        self.finished = True


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"documents are limited to {limit} bytes")


def _check_type(media_type: str, allowed: tuple[str, ...]) -> str:
    if media_type not in allowed:
        raise ApiError(
            415, "unsupported_media_type",
            f"{media_type or 'no type'} is not accepted; send one of {', '.join(allowed)}",
        )
    return media_type


def _check_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in KINDS:
        raise _invalid_kind()
    return kind


def _invalid_kind() -> ApiError:
    return bad_request(f"document kind must be one of {', '.join(KINDS)}", code="invalid_kind")


def _pump(request: Request, consume: Callable[[bytes], None], limit: int) -> None:
    """Feed a multipart body to its parser piece by piece, each a new ``bytes`` object (the
    parser and a hash on another thread may keep them); a body cut short is the client's
    error, and one longer than ``limit`` with its framing (a chunked body carrying parts
    nobody reads, say) is refused as too large."""
    read = body_reader(request).read
    received = 0
    while True:
        try:
            chunk = read(READ_SIZE)
        except (ClientDisconnected, OSError) as exc:  # gunicorn's read errors are OSErrors
            raise _incomplete() from exc
        if not chunk:
            break
        received += len(chunk)
        if received > limit + MULTIPART_FRAMING:
            raise _TooLarge
        consume(chunk)
    _check_complete(request, received)


def _receive(request: Request, sink: _Sink) -> str:
    """Receive a raw body into ``sink`` (which encrypts and writes each piece before the
    next is asked for); the body's SHA-256, hashed as it arrived."""
    body = HashedBody(body_reader(request), request.content_length)
    pieces = body.pieces()
    try:
        while True:
            try:
                piece = next(pieces, None)
            except (ClientDisconnected, OSError) as exc:  # gunicorn's are OSErrors
                raise _incomplete() from exc
            if piece is None:
                break
            sink.write(piece)
    finally:
        pieces.close()  # stops a receiving thread before the request is answered
    _check_complete(request, body.received)
    return body.sha256_hex()


def _check_complete(request: Request, received: int) -> None:
    if request.content_length is not None and received < request.content_length:
        raise _incomplete()


def _incomplete() -> ApiError:
    return bad_request("the upload was cut short", code="incomplete_body")


def upload(svc: Services, request: Request) -> Response:
    ident = authenticate(svc.users, request.headers)
    settings = svc.settings
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise bad_request("Idempotency-Key must be 1-255 printable characters")
        previous = svc.documents.by_idempotency_key(ident.user_id, key)
        if previous is not None:
            UPLOADS.labels("repeated").inc()
            return accepted(previous)
    multipart = request.mimetype == "multipart/form-data"
    # A multipart body carries its framing besides the document: a document at the limit
    # is accepted either way (and Kong lets that much through).
    body_limit = settings.max_upload_bytes + (MULTIPART_FRAMING if multipart else 0)
    if request.content_length is not None and request.content_length > body_limit:
        raise _too_large(settings.max_upload_bytes)
    kind = _check_kind(request.headers.get("X-Document-Kind") or None)
    declared = "" if multipart else _check_type(normalize_media_type(request.mimetype),
                                                 settings.allowed_types)
    filename = request.headers.get("X-Filename")
    doc_id = new_document_id()
    data_key, wrapped = svc.keys.generate({"document_id": doc_id})
    # A raw body is hashed as it is received (shared.hashed_body); a multipart one by the
    # writer, on another core while a core is free.
    digest = BackgroundSha256() if multipart else None
    try:
        with svc.blobs.writer(Area.STAGING, doc_id) as staged:
            writer = EnvelopeWriter(data_key, staged, associated_data=doc_id.encode(),
                                    digest=digest, hash_plaintext=multipart)
            sink = _Sink(writer, settings.max_upload_bytes)
            received_sha256 = ""
            if multipart:
                part = _FilePart(sink, settings.allowed_types)
                kind_field = _KindField()
                parser = StreamingFormDataParser(headers={"Content-Type": request.content_type})
                parser.register("file", part)
                parser.register("kind", kind_field)
                _pump(request, parser.data_received, settings.max_upload_bytes)
                if not part.seen:
                    raise bad_request("multipart upload without a `file` part")
                if not part.finished or (kind_field.started and not kind_field.finished):
                    raise bad_request("the multipart body ends before its closing delimiter",
                                      code="incomplete_body")
                declared = part.check_type()
                filename = part.multipart_filename
                if kind_field.value:
                    kind = _check_kind(kind_field.value.decode(errors="replace"))
            else:
                received_sha256 = _receive(request, sink)
            if writer.plaintext_size == 0:
                raise bad_request("the document is empty", code="empty_document")
            writer.close()
            sha256 = writer.sha256_hex() if multipart else received_sha256
    except _TooLarge:
        raise _too_large(settings.max_upload_bytes) from None
    except ValidationError:  # a `kind` longer than any kind
        raise _invalid_kind() from None
    except (ParseFailedException, ValueError) as exc:  # the multipart parser's complaints
        raise bad_request(f"malformed multipart body: {exc}",
                          code="malformed_multipart") from None
    finally:
        if digest is not None:
            digest.close()
    now = utcnow()
    doc = Document(
        _id=doc_id, owner=ident.user_id, filename=clean_filename(filename),
        declared_type=declared, size=writer.plaintext_size, sha256=sha256,
        status=Status.PROCESSING, created_at=now, updated_at=now, kind=kind,
        wrapped_key=wrapped.to_doc(), idempotency_key=key, upload_event_id=new_document_id(),
    )
    try:
        _record_and_announce(svc, doc)
    except (DuplicateIdempotencyKey, DuplicateContent) as dup:
        if dup.existing.id == doc_id:
            # Our own record, written by an attempt whose answer was lost: it stands.
            return _accepted_new(doc)
        # A concurrent retry of the same upload won the race (Idempotency-Key), or the same
        # bytes from the same driver (a retry without the key, a double tap, two at once):
        # the existing document is the answer, not a second copy; ours leaves no trace.
        svc.blobs.delete(Area.STAGING, doc_id)
        if isinstance(dup, DuplicateIdempotencyKey):
            return accepted(dup.existing)
        UPLOADS.labels("duplicate").inc()
        return accepted(dup.existing, status=200)
    except BaseException as exc:
        recorded = _recorded(svc, doc_id, exc)
        if recorded:
            # The record went in and only what came after failed (the database's answer
            # lost on the way, say): the document is accepted, and the outbox relay
            # publishes its event. Deleting the object now would strand the record.
            log.warning("document %s was recorded although the upload failed after it",
                        doc_id, exc_info=exc)
            return _accepted_new(doc)
        if recorded is False:
            svc.blobs.delete(Area.STAGING, doc_id)
        # Unknown (the database cannot say): the object stays, at worst unreferenced.
        raise
    return _accepted_new(doc)


def _recorded(svc: Services, doc_id: str, error: BaseException) -> bool | None:
    """Whether an upload whose recording raised ``error`` has its record after all; None
    when that cannot be known."""
    if isinstance(error, ServerSelectionTimeoutError):
        return False  # no server was reached: nothing was written
    if not isinstance(error, Exception):
        return None  # the worker is being stopped: no time to ask
    try:
        return svc.documents.get(doc_id) is not None
    except Exception:
        return None


def _accepted_new(doc: Document) -> Response:
    UPLOADS.labels("accepted").inc()
    UPLOAD_BYTES.inc(doc.size)
    with log_context(document_id=doc.id):
        log.info("accepted document %s (%d bytes) from %s", doc.id, doc.size, doc.owner)
    return accepted(doc)


def _record_and_announce(svc: Services, doc: Document) -> None:
    event = make_event(
        DOCUMENT_UPLOADED, svc.settings.event_source, doc.id,
        DocumentUploaded(document_id=doc.id, owner=doc.owner, filename=doc.filename,
                         declared_type=doc.declared_type, size=doc.size, sha256=doc.sha256),
        event_id=doc.upload_event_id,
    )
    # The record and its event are one write: once it succeeds the upload is accepted, and
    # if the broker is away now the outbox relay publishes the event when it is back.
    svc.documents.insert(doc, outbox_event(event))
    publish_recorded(svc, doc.id, event)


def accepted(doc: Document, status: int = 202) -> Response:
    body = Accepted(id=doc.id, status=doc.status.value)
    return json_response(body.model_dump(), status, {"Location": f"/v1/documents/{doc.id}"})
