"""Key-encryption-key (KEK) providers for envelope encryption.

Every document is encrypted under its own random 256-bit data key (see
``shared.envelope``); only the *wrapped* data key (``WrappedKey``) is stored next
to the document. A provider generates data keys, unwraps them, and re-wraps them
under its currently active KEK, which rotates KEKs without re-encrypting any
document.

Wrapping is bound to a ``context`` such as ``{"document_id": "abc"}``: a wrapped
key copied onto another document record does not unwrap there. The local
provider uses the canonical JSON encoding of the context (sorted keys, no
whitespace, UTF-8) as AES-GCM associated data; KMS uses it as EncryptionContext.

Providers
=========

``LocalKeyring`` keeps KEKs in files, for development, tests and single-host
deployments. ``KmsKeyProvider`` delegates to AWS KMS, where the KEK never leaves
the service.

LocalKeyring on-disk layout
===========================

::

    <directory>/                 mode 0700, created if missing
        .lock                    mode 0600, empty; flock()ed exclusively while a key is
                                 created or the active pointer changes
        active                   mode 0600, "<key id>\\n": the KEK that wraps new data keys
        local-<16 hex>.key       mode 0600, exactly 32 raw bytes: one AES-256 KEK

A key id is ``"local-"`` followed by the first 16 hex digits of the SHA-256 of the
key bytes, so it is stable, says nothing useful about the key, and lets a key file
be checked against its name when loaded. Key files are never modified or deleted
by this module: retired KEKs must stay so that old wrapped keys still unwrap.
Every file is written to a temporary name in the same directory, fsynced, then
renamed over its final name with ``os.replace`` (and the directory fsynced), so
readers never see a partial key or pointer and need no lock.

A wrapped key (``WrappedKey.blob``) from the local keyring is
``nonce (12 random bytes) || AES-256-GCM(KEK, data key, aad=context JSON) (32 + 16 bytes)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, cast, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.watched_file import WatchedFile

__all__ = [
    "DATA_KEY_SIZE",
    "KeyProvider",
    "KeyProviderError",
    "KmsKeyProvider",
    "LocalKeyring",
    "WrappedKey",
    "canonical_context",
]

DATA_KEY_SIZE: Final = 32
_KEK_SIZE: Final = 32
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_LOCAL_BLOB_SIZE: Final = _NONCE_SIZE + DATA_KEY_SIZE + _TAG_SIZE
_LOCAL_KEY_ID: Final = re.compile(r"local-[0-9a-f]{16}")
_ACTIVE_FILE: Final = "active"
_POINTER_MAX: Final = 64  # bytes; a pointer holds one key id and a newline
_LOCK_FILE: Final = ".lock"
_KEY_SUFFIX: Final = ".key"

ProviderName = Literal["local", "kms"]


class KeyProviderError(Exception):
    """A data key could not be generated, unwrapped or re-wrapped."""


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted under a KEK, as stored alongside the document."""

    provider: ProviderName
    key_id: str
    blob: bytes

    def to_doc(self) -> dict[str, Any]:
        """BSON-friendly form; ``blob`` stays bytes so it is stored as BinData."""
        return {"provider": self.provider, "key_id": self.key_id, "blob": self.blob}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> WrappedKey:
        try:
            provider = doc["provider"]
            key_id = doc["key_id"]
            blob = doc["blob"]
        except KeyError as exc:
            raise KeyProviderError(f"wrapped key document lacks field {exc.args[0]!r}") from None
        if provider not in ("local", "kms"):
            raise KeyProviderError(f"unknown key provider {provider!r} in wrapped key")
        if not isinstance(key_id, str) or not key_id:
            raise KeyProviderError("wrapped key document has no valid key_id")
        # Drivers hand binary back as bytes subclasses (bson.Binary) or buffers.
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise KeyProviderError(f"wrapped key blob must be binary, got {type(blob).__name__}")
        return cls(provider=cast(ProviderName, provider), key_id=key_id, blob=bytes(blob))


@runtime_checkable
class KeyProvider(Protocol):
    name: str

    def generate(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        """Return a fresh 256-bit data key and its wrapped form."""
        ...

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        """Return the data key; fails unless ``context`` is the one it was wrapped with."""
        ...

    def rewrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> WrappedKey:
        """Re-wrap under the active KEK; ``wrapped`` itself if it already is."""
        ...

    def active_key_id(self) -> str:
        """Id of the KEK that wraps newly generated data keys."""
        ...


def canonical_context(context: Mapping[str, str]) -> bytes:
    """Deterministic encoding of a context, used as associated data."""
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise KeyProviderError("key context keys and values must be strings")
    return json.dumps(
        dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def _local_key_id(key: bytes) -> str:
    return "local-" + hashlib.sha256(key).hexdigest()[:16]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    temp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            # The umask cannot widen 0600, but a restrictive one could narrow it.
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_directory(directory)


class LocalKeyring:
    """KEKs kept in files under ``directory``; see the module docstring for the layout.

    Opening an empty (or missing) directory creates the first KEK and makes it
    active, under an exclusive lock so concurrent processes agree on one key. The
    active pointer is checked on every use, so a ``rotate`` done by another
    process is picked up without restarting.
    """

    name: str = "local"

    def __init__(self, directory: Path) -> None:
        self._directory = Path(directory)
        self._active_path = os.path.join(self._directory, _ACTIVE_FILE)
        self._keys: dict[str, AESGCM] = {}
        # The active key's id, read again only when the pointer file changes.
        self._pointer = WatchedFile(self._active_path, self._parse_pointer, _POINTER_MAX + 1)
        self._ensure_directory()
        if self._read_active() is None:
            with self._locked():
                # Re-check under the lock: another process may have won the race.
                if self._read_active() is None:
                    self._activate(self._create_key())

    @property
    def directory(self) -> Path:
        return self._directory

    def _ensure_directory(self) -> None:
        try:
            self._directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            if not self._directory.is_dir():
                raise KeyProviderError(
                    f"keyring path {self._directory} is not a directory"
                ) from None
        else:
            os.chmod(self._directory, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(
            self._directory / _LOCK_FILE,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            # flock locks belong to the open file description, so this excludes
            # other threads of this process as well as other processes.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the lock

    def _read_active(self) -> str | None:
        # Every upload asks for the active key: a stat, and a read only after a change.
        return self._pointer.current()

    def _parse_pointer(self, text: bytes) -> str:
        key_id = text.decode("ascii", "replace").strip()
        if not _LOCAL_KEY_ID.fullmatch(key_id):
            raise KeyProviderError(f"corrupt active key pointer in {self._directory}")
        return key_id

    def _create_key(self) -> str:
        key = AESGCM.generate_key(bit_length=256)
        key_id = _local_key_id(key)
        if (self._directory / f"{key_id}{_KEY_SUFFIX}").exists():
            raise KeyProviderError(f"key id collision for {key_id}")
        _atomic_write(self._directory, f"{key_id}{_KEY_SUFFIX}", key)
        self._keys[key_id] = AESGCM(key)
        return key_id

    def _activate(self, key_id: str) -> None:
        _atomic_write(self._directory, _ACTIVE_FILE, f"{key_id}\n".encode("ascii"))

    def _kek(self, key_id: str) -> AESGCM:
        cached = self._keys.get(key_id)
        if cached is not None:
            return cached
        # Key ids come from stored documents: never let one name a path outside.
        if not _LOCAL_KEY_ID.fullmatch(key_id):
            raise KeyProviderError(f"invalid local key id {key_id!r}")
        path = self._directory / f"{key_id}{_KEY_SUFFIX}"
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            raise KeyProviderError(
                f"unknown key id {key_id!r}: no such key in keyring {self._directory}"
            ) from None
        if len(key) != _KEK_SIZE or _local_key_id(key) != key_id:
            raise KeyProviderError(f"key file {path} is corrupt (does not match its id)")
        aead = AESGCM(key)
        self._keys[key_id] = aead
        return aead

    def active_key_id(self) -> str:
        key_id = self._read_active()
        if key_id is None:
            raise KeyProviderError(f"keyring {self._directory} has no active key")
        return key_id

    def rotate(self) -> str:
        """Create a new KEK, make it active, and return its id; old KEKs are kept."""
        with self._locked():
            key_id = self._create_key()
            self._activate(key_id)
        return key_id

    def _wrap(self, key_id: str, data_key: bytes, aad: bytes) -> WrappedKey:
        nonce = os.urandom(_NONCE_SIZE)
        blob = nonce + self._kek(key_id).encrypt(nonce, data_key, aad)
        return WrappedKey(provider="local", key_id=key_id, blob=blob)

    def generate(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        aad = canonical_context(context)
        data_key = AESGCM.generate_key(bit_length=256)
        return data_key, self._wrap(self.active_key_id(), data_key, aad)

    def _unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if wrapped.provider != "local":
            raise KeyProviderError(
                f"wrapped key belongs to provider {wrapped.provider!r}, not 'local'"
            )
        kek = self._kek(wrapped.key_id)
        blob = wrapped.blob
        if len(blob) != _LOCAL_BLOB_SIZE:
            raise KeyProviderError(
                f"unwrap failed for key {wrapped.key_id}: blob is {len(blob)} bytes, "
                f"expected {_LOCAL_BLOB_SIZE}"
            )
        try:
            return kek.decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], aad)
        except InvalidTag:
            raise KeyProviderError(
                f"unwrap failed for key {wrapped.key_id}: wrong context or tampered blob"
            ) from None

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        return self._unwrap(wrapped, canonical_context(context))

    def rewrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> WrappedKey:
        """Re-wrap under the active KEK.

        A key already under the active KEK is returned as is, without being
        checked, so that rotation jobs can skip it cheaply.
        """
        active = self.active_key_id()
        if wrapped.provider == "local" and wrapped.key_id == active:
            return wrapped
        aad = canonical_context(context)
        return self._wrap(active, self._unwrap(wrapped, aad), aad)


class KmsKeyProvider:
    """Data keys wrapped by an AWS KMS symmetric key.

    ``key_id`` may be a key id, key ARN, alias name or alias ARN. ``WrappedKey.key_id``
    always holds the key ARN that KMS reports, and ``active_key_id`` resolves the
    configured id to that ARN (once per instance) so the two compare.
    """

    name: str = "kms"

    def __init__(self, key_id: str, client: Any | None = None) -> None:
        if client is None:
            # Imported lazily: boto3 is slow to import and only KMS users need it.
            import boto3

            client = boto3.client("kms")
        self._key_id = key_id
        self._client: Any = client
        self._resolved_arn: str | None = None

    @property
    def key_id(self) -> str:
        """The key id as configured (possibly an alias)."""
        return self._key_id

    @contextlib.contextmanager
    def _kms_call(self, operation: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            message = error.get("Message") or str(exc)
            hint = ""
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                hint = " (wrong context, wrong key, or tampered blob)"
            raise KeyProviderError(f"KMS {operation} failed: {code}: {message}{hint}") from exc
        except BotoCoreError as exc:
            raise KeyProviderError(f"KMS {operation} failed: {exc}") from exc

    def active_key_id(self) -> str:
        if self._resolved_arn is None:
            with self._kms_call("DescribeKey"):
                response = self._client.describe_key(KeyId=self._key_id)
            self._resolved_arn = str(response["KeyMetadata"]["Arn"])
        return self._resolved_arn

    def generate(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        canonical_context(context)  # same type checks as the local provider
        with self._kms_call("GenerateDataKey"):
            response = self._client.generate_data_key(
                KeyId=self._key_id, KeySpec="AES_256", EncryptionContext=dict(context)
            )
        data_key = bytes(response["Plaintext"])
        if len(data_key) != DATA_KEY_SIZE:
            raise KeyProviderError(f"KMS returned a {len(data_key)}-byte data key")
        wrapped = WrappedKey(
            provider="kms", key_id=str(response["KeyId"]), blob=bytes(response["CiphertextBlob"])
        )
        return data_key, wrapped

    def _check_provider(self, wrapped: WrappedKey) -> None:
        if wrapped.provider != "kms":
            raise KeyProviderError(
                f"wrapped key belongs to provider {wrapped.provider!r}, not 'kms'"
            )

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        self._check_provider(wrapped)
        canonical_context(context)
        with self._kms_call("Decrypt"):
            response = self._client.decrypt(
                CiphertextBlob=wrapped.blob,
                EncryptionContext=dict(context),
                KeyId=wrapped.key_id,
            )
        data_key = bytes(response["Plaintext"])
        if len(data_key) != DATA_KEY_SIZE:
            raise KeyProviderError(f"KMS returned a {len(data_key)}-byte data key")
        return data_key

    def rewrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> WrappedKey:
        """Re-wrap under this provider's key with KMS ReEncrypt (the data key never leaves KMS).

        A key already under the active KEK is returned as is, without a KMS call.
        """
        self._check_provider(wrapped)
        canonical_context(context)
        if wrapped.key_id == self.active_key_id():
            return wrapped
        with self._kms_call("ReEncrypt"):
            response = self._client.re_encrypt(
                CiphertextBlob=wrapped.blob,
                SourceEncryptionContext=dict(context),
                SourceKeyId=wrapped.key_id,
                DestinationKeyId=self._key_id,
                DestinationEncryptionContext=dict(context),
            )
        return WrappedKey(
            provider="kms", key_id=str(response["KeyId"]), blob=bytes(response["CiphertextBlob"])
        )
