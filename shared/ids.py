"""Identifiers the system generates itself; only these ever become parts of a path."""

from __future__ import annotations

import re
import uuid

_DOC_ID = re.compile(r"^[0-9a-f]{32}$")


def new_document_id() -> str:
    return uuid.uuid4().hex


def is_document_id(value: str) -> bool:
    return bool(_DOC_ID.fullmatch(value))
