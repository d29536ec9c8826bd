"""The HTTP API's request and response bodies, as pydantic models.

Handlers validate requests and shape responses with these, and the OpenAPI document takes
its schemas from them, so the description cannot drift from what the code does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.documents import KINDS

Kind = Literal["proof_of_delivery", "bill_of_lading", "receipt", "photo", "other"]
assert set(KINDS) == set(Kind.__args__)  # type: ignore[attr-defined]

_STRICT = ConfigDict(extra="forbid")
Tag = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[^\x00-\x1f]+$")]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Accepted(BaseModel):
    id: str
    status: Literal["processing", "stored", "rejected", "failed", "deleted"]


class DocumentView(BaseModel):
    id: str
    owner: str
    status: Literal["processing", "stored", "rejected", "failed", "deleted"]
    filename: str
    media_type: str
    size: int
    sha256: str
    created_at: datetime
    kind: Kind | None = None
    tags: list[str] = Field(default_factory=list)
    note: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    download_url: str | None = None
    download_url_expires: datetime | None = None
    reason: str | None = None
    deleted_at: datetime | None = None
    deleted_by: str | None = None


class DocumentPage(BaseModel):
    items: list[DocumentView]
    next_cursor: str | None


def _not_null(value: object, instead: str) -> object:
    """An explicit null for a field a record always has (validators run on sent values
    only: a field left out stays unset)."""
    if value is None:
        raise ValueError(f"may not be null; send {instead}")
    return value


class DocumentPatch(BaseModel):
    """Fields left out stay as they are; ``kind`` and ``note`` are cleared with null, tags
    with [] (a record's tags are a list, so null is refused rather than stored)."""

    model_config = _STRICT
    kind: Kind | None = None
    tags: list[Tag] | None = Field(default=None, max_length=20)
    note: str | None = Field(default=None, max_length=2000)

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_not_null(cls, value: object) -> object:
        return _not_null(value, "[] to clear them")


class LinkRequest(BaseModel):
    model_config = _STRICT
    expires_in: int | None = Field(default=None, gt=0, description="seconds; at most the default")


class LinkView(BaseModel):
    download_url: str
    expires_at: datetime


class DeviceRegistration(BaseModel):
    model_config = _STRICT
    # FCM registration tokens are ~150-200 characters; the cap only stops abuse.
    token: str = Field(min_length=1, max_length=4096, pattern=r"^[\x21-\x7e]+$")
    platform: Literal["android", "ios", "web"]


class DeviceView(BaseModel):
    id: str
    platform: Literal["android", "ios", "web"]
    added_at: datetime
    last_seen: datetime


class DeviceRegistered(BaseModel):
    id: str
    platform: Literal["android", "ios", "web"]
    registered: bool


class UserView(BaseModel):
    id: str
    role: Literal["driver", "agent"]
    kong_role: Literal["driver", "agent"]
    role_limit: Literal["driver", "agent"] | None
    display_name: str | None
    status: Literal["active", "disabled"]
    created_at: datetime
    devices: list[DeviceView]


class UserPage(BaseModel):
    items: list[UserView]
    next_cursor: str | None


class UserPatch(BaseModel):
    """Fields left out stay as they are; ``role`` and ``status`` always have a value, so
    null is refused for them (``role: agent`` lifts a restriction to driver rights)."""

    model_config = _STRICT
    role: Literal["driver", "agent"] | None = None
    status: Literal["active", "disabled"] | None = None
    display_name: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("role", "status", mode="before")
    @classmethod
    def _always_set(cls, value: object) -> object:
        return _not_null(value, "one of its values")


class AuditView(BaseModel):
    id: str
    at: datetime
    actor: str
    actor_role: str
    action: str
    target_type: str
    target_id: str
    document_id: str | None
    request_id: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditView]
    next_cursor: str | None
