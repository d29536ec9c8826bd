"""One settings model for every function and command, read from the environment.

Each external service is optional: leaving its variable unset selects the embedded stand-in
(README, "Configuration"). A bad value fails at start with a message naming the variable.
"""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ALLOWED_TYPES = (
    "application/pdf",
    "image/jpeg",
    "image/png",
    "image/tiff",
    "image/heic",
)
DEFAULT_PORT = 8080
MIB = 1024 * 1024
MAX_RETRY_DELAY = 24 * 3600.0


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", frozen=True,
        populate_by_name=True,
        # "inf" or "nan" for a number of seconds fails later, far from the setting (a
        # thread's wait overflows, a queue's TTL cannot be computed).
        allow_inf_nan=False,
    )

    amqp_url: str | None = Field(default=None, validation_alias="AMQP_URL")
    mongodb_uri: str | None = Field(default=None, validation_alias="MONGODB_URI")
    mongodb_database: str = Field(default="docproc", validation_alias="MONGODB_DATABASE")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    data_dir: Path = Field(default=Path(".docproc"), validation_alias="DOCPROC_DATA_DIR")
    efs_root_override: Path | None = Field(default=None, validation_alias="EFS_ROOT")
    kms_key_id: str | None = Field(default=None, validation_alias="KMS_KEY_ID")
    firebase_credentials: Path | None = Field(
        default=None, validation_alias="FIREBASE_CREDENTIALS"
    )
    fcm_endpoint: str | None = Field(default=None, validation_alias="FCM_ENDPOINT")
    public_url_override: str | None = Field(default=None, validation_alias="DOCPROC_PUBLIC_URL")
    port: int = Field(
        default=DEFAULT_PORT, ge=1, le=65535, validation_alias=AliasChoices("DOCPROC_PORT", "PORT")
    )
    max_upload_bytes: int = Field(
        default=50 * MIB, gt=0, validation_alias="DOCPROC_MAX_UPLOAD_BYTES"
    )
    allowed_types: Annotated[tuple[str, ...], NoDecode] = Field(
        default=DEFAULT_ALLOWED_TYPES, validation_alias="DOCPROC_ALLOWED_TYPES"
    )
    link_ttl_seconds: int = Field(
        default=7 * 24 * 3600, gt=0, validation_alias="DOCPROC_LINK_TTL_SECONDS"
    )
    link_key: str | None = Field(default=None, min_length=32,
                                 validation_alias="DOCPROC_LINK_KEY")
    link_previous_key: str | None = Field(default=None, min_length=32,
                                          validation_alias="DOCPROC_LINK_PREVIOUS_KEY")
    # Until when links signed with the previous key are still accepted.
    link_previous_key_until: datetime | None = Field(
        default=None, validation_alias="DOCPROC_LINK_PREVIOUS_KEY_UNTIL")
    link_grace_seconds: int = Field(default=7 * 24 * 3600, ge=0,
                                    validation_alias="DOCPROC_LINK_GRACE_SECONDS")
    # When set, requests must carry it in X-Gateway-Secret (Kong adds it): proof that the
    # X-Consumer-* identity headers come from Kong and not from someone bypassing it.
    gateway_secret: str | None = Field(default=None, min_length=16,
                                       validation_alias="DOCPROC_GATEWAY_SECRET")
    # Prefix of RabbitMQ exchange and queue names; lets several installations (or test runs)
    # share one broker without seeing each other's events.
    amqp_prefix: str = Field(
        default="docproc", pattern=r"^[A-Za-z0-9_.-]+$", validation_alias="DOCPROC_AMQP_PREFIX"
    )
    redis_prefix: str = Field(default="docproc:", validation_alias="DOCPROC_REDIS_PREFIX")
    # Knative's SinkBinding/ContainerSource inject K_SINK; when set, events go there over HTTP.
    k_sink: str | None = Field(default=None, validation_alias="K_SINK")
    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(1.0, 5.0, 30.0, 120.0), validation_alias="DOCPROC_RETRY_DELAYS"
    )
    outbox_grace_seconds: float = Field(default=10.0, ge=0,
                                        validation_alias="DOCPROC_OUTBOX_GRACE_SECONDS")
    # How long a confirmed upload event's "published" mark waits before it is written (0: at
    # once): by then storage has usually recorded the outcome, which makes the write moot
    # (shared/outbox_marks.py). At most half the grace, so the relay never races a mark.
    outbox_mark_linger_seconds: float = Field(
        default=2.0, ge=0, le=60.0, validation_alias="DOCPROC_OUTBOX_MARK_LINGER_SECONDS"
    )
    relay_interval_seconds: float = Field(default=2.0, gt=0,
                                          validation_alias="DOCPROC_RELAY_INTERVAL_SECONDS")
    # A PDF or TIFF over 1 MiB is inspected by another process that may grow by this much
    # and must answer within this time; past either the document is rejected
    # (shared/inspection/isolated.py). Two such inspectors may run at once per process.
    inspection_memory_mib: int = Field(default=192, ge=64, le=4096,
                                       validation_alias="DOCPROC_INSPECTION_MEMORY_MIB")
    inspection_seconds: float = Field(default=120.0, gt=0, le=3600.0,
                                      validation_alias="DOCPROC_INSPECTION_SECONDS")
    # How long `docproc worker` and `docproc serve` wait for a MongoDB server that does not
    # answer when they start (a deploy racing the database's own restart) before giving up.
    startup_wait_seconds: float = Field(default=300.0, ge=0, le=3600.0,
                                        validation_alias="DOCPROC_STARTUP_WAIT_SECONDS")
    worker_concurrency: int = Field(
        default=4, ge=1, le=256, validation_alias="DOCPROC_WORKER_CONCURRENCY"
    )
    # The most events a handler thread takes in one call when a backlog waits (RabbitMQ
    # runner, events/runner.py); 1 hands them over one at a time. 8 took 6% fewer database
    # operations per small document than 4 at full rate (bench/README.md, Finding 43).
    worker_batch: int = Field(default=8, ge=1, le=64, validation_alias="DOCPROC_WORKER_BATCH")
    # A CloudEvents source is a non-empty URI-reference: without one every event this
    # installation sends is malformed to its consumers.
    event_source: str = Field(default="/docproc", pattern=r"^\S+$",
                              validation_alias="DOCPROC_EVENT_SOURCE")

    @field_validator("allowed_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        if isinstance(value, str):
            items = tuple(t.strip().lower() for t in value.split(",") if t.strip())
            if not items:
                raise ValueError("must list at least one media type")
            for item in items:
                if item.count("/") != 1 or " " in item:
                    raise ValueError(f"{item!r} is not a media type like application/pdf")
            return items
        return value

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                delays = tuple(float(v) for v in value.split(",") if v.strip())
            except ValueError as exc:
                raise ValueError("must be comma-separated seconds, e.g. 1,5,30") from exc
            return delays
        return value

    @field_validator("retry_delays")
    @classmethod
    def _delays_in_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        # Empty would dead-letter every failure at once; each delay is a RabbitMQ holding
        # queue's message TTL.
        if not value:
            raise ValueError("must list at least one delay, e.g. 1,5,30")
        if any(not 0 <= d <= MAX_RETRY_DELAY for d in value):
            raise ValueError(f"each delay must be 0 to {MAX_RETRY_DELAY:g} seconds")
        return value

    @field_validator("amqp_url", "mongodb_uri", "redis_url", "kms_key_id", "k_sink", "link_key",
                     "link_previous_key", "fcm_endpoint", "public_url_override",
                     "gateway_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # An exported-but-empty variable means "not configured", as shells make that easy.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("firebase_credentials", "efs_root_override", "link_previous_key_until",
                     mode="before")
    @classmethod
    def _blank_path_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @field_validator("mongodb_uri")
    @classmethod
    def _mongo_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("must start with mongodb:// or mongodb+srv://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("public_url_override", "fcm_endpoint", "k_sink")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        bad = ValueError("must be an http:// or https:// URL with a host, "
                         "e.g. https://docs.example.com")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise bad  # urlsplit drops tabs and newlines, where a client would not
        try:
            parts = urlsplit(value)
            port = parts.port  # raises for a port that is not a number or out of range
        except ValueError:
            raise bad from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
            raise bad
        # Links and endpoint paths are appended to it: a query or fragment would swallow them.
        if parts.query or parts.fragment or value.endswith(("?", "#")):
            raise ValueError("must have no query (?) or fragment (#)")
        return value.rstrip("/")

    @field_validator("firebase_credentials")
    @classmethod
    def _credentials_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _previous_link_key_differs(self) -> Settings:
        # The same key twice would carry the previous key's retirement time: every link,
        # new ones included, would be refused once DOCPROC_LINK_PREVIOUS_KEY_UNTIL passed.
        if self.link_previous_key is not None and self.link_previous_key == self.link_key:
            raise ValueError("DOCPROC_LINK_PREVIOUS_KEY must differ from DOCPROC_LINK_KEY")
        return self

    @model_validator(mode="after")
    def _marks_before_the_relay(self) -> Settings:
        if self.outbox_mark_linger_seconds > self.outbox_grace_seconds / 2:
            raise ValueError(
                f"DOCPROC_OUTBOX_MARK_LINGER_SECONDS ({self.outbox_mark_linger_seconds:g}) must "
                f"be at most half of DOCPROC_OUTBOX_GRACE_SECONDS "
                f"({self.outbox_grace_seconds:g}): the outbox relay would publish again the "
                f"events whose marks are still waiting")
        return self

    @cached_property
    def efs_root(self) -> Path:
        return self.efs_root_override or self.data_dir / "efs"

    @cached_property
    def public_url(self) -> str:
        return self.public_url_override or f"http://127.0.0.1:{self.port}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox" / "notifications.jsonl"

    @property
    def embedded_mongo_dir(self) -> Path:
        return self.data_dir / "mongo"


def load_settings(**overrides: object) -> Settings:
    """Read the environment; turn pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a check across settings names them itself
                lines.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            field = Settings.model_fields.get(name)
            alias = field.validation_alias if field is not None else None
            if isinstance(alias, AliasChoices):
                variable = str(alias.choices[0])
            else:
                variable = str(alias) if alias else name.upper()
            lines.append(f"{variable}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
