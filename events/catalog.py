"""The CloudEvents docproc emits and consumes: their types and pydantic data models.

Types are reverse-DNS and name the fact that happened; a breaking change to a data model
bumps its ``schema_version`` (and its ``dataschema``), so consumers can tell versions apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DOCUMENT_UPLOADED = "io.docproc.document.uploaded"
DOCUMENT_STORED = "io.docproc.document.stored"
DOCUMENT_REJECTED = "io.docproc.document.rejected"

SHA256_HEX = r"^[0-9a-f]{64}$"
DOC_ID = r"^[0-9a-f]{32}$"


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1


class DocumentUploaded(EventData):
    document_id: str = Field(pattern=DOC_ID)
    owner: str = Field(min_length=1, max_length=128)
    filename: str = Field(max_length=255)
    declared_type: str = Field(max_length=127)
    size: int = Field(gt=0)
    sha256: str = Field(pattern=SHA256_HEX)


class DocumentStored(EventData):
    document_id: str = Field(pattern=DOC_ID)
    owner: str = Field(min_length=1, max_length=128)
    filename: str = Field(max_length=255)
    media_type: str
    size: int = Field(gt=0)
    sha256: str = Field(pattern=SHA256_HEX)
    # A signed link still needs the owner's identity to be used (see shared.links).
    download_url: str
    download_url_expires: int


class DocumentRejected(EventData):
    document_id: str = Field(pattern=DOC_ID)
    owner: str = Field(min_length=1, max_length=128)
    filename: str = Field(max_length=255)
    reason: str = Field(max_length=1000)


MODELS: dict[str, type[EventData]] = {
    DOCUMENT_UPLOADED: DocumentUploaded,
    DOCUMENT_STORED: DocumentStored,
    DOCUMENT_REJECTED: DocumentRejected,
}


def dataschema(event_type: str) -> str:
    return f"urn:docproc:schema:{event_type}:v1"
