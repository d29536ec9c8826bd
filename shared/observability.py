"""Structured logs, trace context and Prometheus metrics shared by every function.

With ``DOCPROC_LOG_FORMAT=json`` logs are JSON lines carrying the CloudEvent id, the
document id, the request id and the W3C ``traceparent`` of whatever is being handled, so one
document can be followed across functions. The trace context travels with events as the
CloudEvents distributed-tracing extension attribute ``traceparent``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "docproc_log_context", default=None)

UPLOADS = Counter("docproc_uploads_total", "Uploads answered, by result", ["result"])
UPLOAD_BYTES = Counter("docproc_upload_bytes_total", "Bytes of accepted documents")
PROCESSING = Histogram("docproc_processing_seconds",
                       "From upload to the stored or rejected outcome", ["outcome"],
                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
HANDLED = Counter("docproc_events_handled_total", "Events handled, by function and result",
                  ["function", "result"])
RETRIES = Counter("docproc_event_retries_total", "Events scheduled for another attempt",
                  ["function"])
DEAD_LETTERS = Counter("docproc_dead_letters_total", "Events dead-lettered", ["function"])
NOTIFICATIONS = Counter("docproc_notifications_total", "Pushes by outcome", ["outcome"])
# "written": the record still held the confirmed event; "moot": its outcome was recorded
# first, which emptied the outbox (shared/outbox_marks.py).
OUTBOX_MARKS = Counter("docproc_outbox_marks_total",
                       "Confirmed events' outbox marks, by whether a record still held them",
                       ["result"])
HTTP_REQUESTS = Counter("docproc_http_requests_total", "HTTP answers by endpoint and status",
                        ["endpoint", "status"])


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """A new span in the caller's trace (or a new trace when the header is unusable)."""
    parts = (parent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return f"00-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return new_traceparent()


def current_traceparent() -> str | None:
    return (_context.get() or {}).get("traceparent")


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Fields every log line in this block carries."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **(_context.get() or {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _ContextText(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = _context.get() or {}
        if ctx:
            text += "  [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]"
        return text


def setup_logging(level: int = logging.INFO, fmt: str | None = None) -> None:
    """JSON lines (DOCPROC_LOG_FORMAT=json, for clusters) or readable text (the default)."""
    fmt = fmt or os.environ.get("DOCPROC_LOG_FORMAT", "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _ContextText(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty clients whose debug output could carry connection details.
    # pymongo at debug level logs whole commands: device tokens, wrapped keys, sealed links.
    for noisy in ("pika", "urllib3", "google", "botocore", "secantus", "pymongo"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # pika logs every failed reconnection attempt with a traceback (thousands of lines for a
    # few seconds of broker outage); the runner and publisher report outages themselves.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
