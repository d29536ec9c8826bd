"""Opaque cursors for keyset pagination: stable while new records arrive, unlike offsets."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from shared.errors import bad_request

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    # isdigit() also takes "²", which int() refuses: ASCII digits, few enough to be a limit.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}", code="invalid_query")
    return int(raw)


def encode_cursor(*position: Any) -> str:
    values = [v.isoformat() if isinstance(v, datetime) else v for v in position]
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_cursor(raw: str, arity: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise bad_request("cursor is not one this API returned", code="invalid_cursor") from None
    if not isinstance(values, list) or len(values) != arity or not all(
        isinstance(v, str) for v in values
    ):
        raise bad_request("cursor is not one this API returned", code="invalid_cursor")
    return values


def newest_first_after(cursor: str | None, field: str) -> dict[str, Any]:
    """The filter for records after ``cursor`` in (``field`` desc, _id desc) order."""
    if cursor is None:
        return {}
    at_raw, last_id = decode_cursor(cursor, 2)
    try:
        at = utc_time(at_raw)
    except ValueError:
        raise bad_request("cursor is not one this API returned", code="invalid_cursor") from None
    return {"$or": [{field: {"$lt": at}}, {field: at, "_id": {"$lt": last_id}}]}


def utc_time(raw: str) -> datetime:
    """An ISO 8601 time as UTC, as the database will hold it (no zone: UTC). ValueError when
    it is not one, or when it falls outside the years 1-9999 once in UTC ("0001-01-01T00:00
    +01:00"), which would otherwise fail only when the query is encoded."""
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{raw} is out of range in UTC") from None
