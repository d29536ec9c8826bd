"""Consistent backups of a docproc installation: the MongoDB metadata and the EFS ciphertext.

API (the ``docproc backup create|list|verify|restore`` commands print the returned objects)::

    create_backup(svc, dest, progress=None) -> Manifest
    list_backups(dest_root) -> list[ManifestSummary]        # newest first
    verify_backup(svc, src, sample=None) -> VerifyReport      # sample=None: every object
    restore_backup(svc, src, progress=None) -> RestoreReport  # into an empty installation

``dest``/``dest_root`` is a local directory or an ``s3://bucket/prefix`` URL; ``create_backup``
writes one backup below it and ``src`` names that backup (``Manifest.location``, also shown
by ``list_backups``). S3 goes through boto3 with its usual configuration: credentials,
region, and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for an S3-compatible endpoint.

Layout of one backup
====================

::

    <dest>/<backup-id>/
        manifest.json                   written last: a backup without it is incomplete
        mongo/documents.jsonl           one record per line, MongoDB Extended JSON (canonical),
        mongo/users.jsonl               so dates, binary (wrapped keys, sealed links) and
        mongo/audit.jsonl               32/64-bit integers come back with their exact types
        mongo/deliveries.jsonl
        efs/objects/<aa>/<bb>/<id>      the stored envelope of each document, byte for byte

A backup id is the UTC time the backup started plus a random suffix
(``20261124T153012.345Z-1a2b3c4d``), so ids sort by time and never collide. The manifest
(``format_version`` 1) lists every file with its size and the SHA-256 of its stored bytes,
the record count of each collection, the documents per status, the start and end times, the
objects that vanished while the backup ran, and the key provider and key-encryption keys
(KEKs) that wrap the documents' data keys.

Backups stay encrypted: objects are copied as the ciphertext they are, never decrypted.

Consistency
===========

The MongoDB collections are exported first (documents before users, so every owner is in
the users export; then audit and deliveries), and then exactly the objects of the documents
that export shows as ``stored`` are copied. Documents created after the export are not in
the backup; a document deleted between the export and the copy of its object (its file is
gone) is listed in ``missing_objects`` and reported, and it restores as a record without a
file. Objects are never partially visible on EFS (the store renames complete files into
place), so every copied object is whole.

Keys: what is *not* in a backup
===============================

The KEKs are not in the backup. They live in AWS KMS (``KMS_KEY_ID``) or, with the local
keyring, in ``<data dir>/keys``. The installation a backup is restored into must be able to
unwrap the data keys with the same KEKs, or every restored document is unreadable:

* KMS: the restoring installation uses the same key (or a multi-Region replica of it) and
  its role may call ``kms:Decrypt`` on it. Scheduling the KMS key for deletion makes every
  backup unreadable.
* Local keyring: copy the original's ``<data dir>/keys`` directory (all ``local-*.key``
  files and ``active``; ``link-keys.json`` too if links signed before should stay valid) into
  the new data dir *before* the new installation first starts, otherwise it generates a keyring
  of its own. Keep that directory backed up separately from the backups themselves: the
  ciphertext and the keys together are the plaintext.

The manifest names the provider and every KEK in use; ``restore_backup`` unwraps one data
key per KEK before writing anything and refuses, naming the KEK, if it cannot.

A backup keeps the wrapped keys of documents that are crypto-shredded later: until the
backup is deleted, such a document can be restored. The retention of backups therefore
bounds how long a deletion takes to become final.

Restore
=======

Only into an empty installation (no documents, users, audit or delivery records, no files in
EFS ``objects/``); anything else is refused. Every file is checked against its manifest
checksum while it is read; the objects are written first (temporary file, fsync, rename, via
the blob store), then the records are inserted, then the indexes are (re)built, so a record
never points at a missing file. On failure everything the restore wrote is removed again.
Stored download links are dropped from the restored records: they carry the original's host
and signing key, and the restored installation signs fresh ones on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final, cast

from bson import json_util
from pymongo import ASCENDING
from pymongo.collection import Collection

from docproc.runtime import Services
from shared.aws_backup import aws_error_code
from shared.blobstore import Area, fsync_dir
from shared.documents import Status
from shared.envelope import EnvelopeError, decrypt_stream
from shared.ids import is_document_id
from shared.keys import KeyProviderError, WrappedKey

__all__ = [
    "COLLECTIONS",
    "FORMAT_VERSION",
    "BackupError",
    "FileEntry",
    "KeyUse",
    "Manifest",
    "ManifestSummary",
    "Problem",
    "RestoreRefused",
    "RestoreReport",
    "VerifyReport",
    "create_backup",
    "list_backups",
    "restore_backup",
    "verify_backup",
]

FORMAT: Final = "docproc-backup"
FORMAT_VERSION: Final = 1
# Export order matters for consistency: see the module docstring.
COLLECTIONS: Final = ("documents", "users", "audit", "deliveries")
MANIFEST: Final = "manifest.json"
_COPY_BUFFER: Final = 1024 * 1024
_INSERT_BATCH: Final = 500
_BACKUP_ID: Final = re.compile(r"(\d{8}T\d{6}\.\d{3})Z-[0-9a-f]{8}")
# Canonical mode keeps every BSON type distinct (Int64 vs int, dates as milliseconds);
# tz_aware matches the application's client, so restored dates compare equal.
_JSON: Final = json_util.CANONICAL_JSON_OPTIONS.with_options(tz_aware=True, tzinfo=UTC)
# Fields derived from the source installation's public URL and link signing key.
_LINK_FIELDS: Final = ("download_url_enc", "download_url_expires")

Progress = Callable[[str], None]


class BackupError(Exception):
    """A backup could not be written, read, verified or restored."""


class RestoreRefused(BackupError):
    """The restore would overwrite data, or the target cannot read the backup; nothing was
    written."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the backup, "/"-separated
    size: int
    sha256: str  # of the bytes as stored in the backup


@dataclass(frozen=True)
class KeyUse:
    provider: str
    key_id: str
    documents: int  # records whose data key this KEK wraps


@dataclass
class Manifest:
    backup_id: str
    created_at: datetime  # when the export started: the point in time the backup shows
    completed_at: datetime
    key_provider: str
    active_key_id: str | None
    keys_in_use: list[KeyUse]
    collections: dict[str, int]
    documents_by_status: dict[str, int]
    files: list[FileEntry]
    missing_objects: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    location: str = ""  # where it was read from or written to; not stored in the file

    @property
    def objects(self) -> list[FileEntry]:
        return [f for f in self.files if f.path.startswith("efs/")]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "backup_id": self.backup_id,
            "created_at": self.created_at.isoformat(),
            "completed_at": self.completed_at.isoformat(),
            "source": self.source,
            "keys": {
                "provider": self.key_provider,
                "active_key_id": self.active_key_id,
                "in_use": [{"provider": k.provider, "key_id": k.key_id,
                            "documents": k.documents} for k in self.keys_in_use],
            },
            "collections": self.collections,
            "documents_by_status": self.documents_by_status,
            "objects": len(self.objects),
            "missing_objects": self.missing_objects,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Any, location: str = "") -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BackupError(f"{location}: {MANIFEST} is not a docproc backup manifest")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BackupError(f"{location}: backup format version {version!r} is not one this "
                              f"docproc reads (up to {FORMAT_VERSION})")
        try:
            keys = data["keys"]
            return cls(
                backup_id=str(data["backup_id"]),
                created_at=datetime.fromisoformat(data["created_at"]),
                completed_at=datetime.fromisoformat(data["completed_at"]),
                key_provider=str(keys["provider"]),
                active_key_id=keys.get("active_key_id"),
                keys_in_use=[KeyUse(str(k["provider"]), str(k["key_id"]), int(k["documents"]))
                             for k in keys["in_use"]],
                collections={str(k): int(v) for k, v in data["collections"].items()},
                documents_by_status={str(k): int(v)
                                     for k, v in data.get("documents_by_status", {}).items()},
                files=[FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"]))
                       for f in data["files"]],
                missing_objects=[str(i) for i in data.get("missing_objects", [])],
                source={str(k): str(v) for k, v in data.get("source", {}).items()},
                format_version=version,
                location=location,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupError(f"{location}: malformed {MANIFEST}: {exc!r}") from None

    def __str__(self) -> str:
        took = (self.completed_at - self.created_at).total_seconds()
        counts = ", ".join(f"{name} {n}" for name, n in self.collections.items())
        statuses = ", ".join(f"{s} {n}" for s, n in sorted(self.documents_by_status.items()))
        lines = [
            f"backup {self.backup_id}  {self.location}",
            f"  created   {_when(self.created_at)} (took {took:.1f} s)",
            f"  records   {counts}",
            f"  documents {statuses or 'none'}",
            f"  objects   {len(self.objects)} files, {_size(sum(f.size for f in self.objects))}"
            f" ({len(self.files)} files, {_size(self.total_bytes)} in all)",
            f"  keys      {_keys_line(self.key_provider, self.keys_in_use)}",
        ]
        if self.missing_objects:
            lines.append(f"  missing   {len(self.missing_objects)} object(s) deleted while the "
                         f"backup ran: {', '.join(self.missing_objects)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ManifestSummary:
    backup_id: str
    location: str
    complete: bool  # False: no (readable) manifest, the backup did not finish
    created_at: datetime | None
    documents: int | None = None
    objects: int | None = None
    size: int | None = None
    key_provider: str | None = None
    key_ids: tuple[str, ...] = ()
    note: str | None = None  # why it is incomplete

    def __str__(self) -> str:
        when = _when(self.created_at) if self.created_at else "?"
        if not self.complete:
            return f"{self.backup_id}  {when}  INCOMPLETE ({self.note})  {self.location}"
        keys = ", ".join(self.key_ids) or "no keys"
        return (f"{self.backup_id}  {when}  {self.documents} documents, {self.objects} objects, "
                f"{_size(self.size or 0)}  [{self.key_provider}: {keys}]  {self.location}")


@dataclass(frozen=True)
class Problem:
    path: str  # the file in the backup (or manifest.json)
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class VerifyReport:
    backup_id: str
    location: str
    files_listed: int = 0
    checksums_verified: int = 0  # files whose every byte was read and hashed
    objects_decrypted: int = 0  # objects decrypted and matched to their document record
    objects_sampled_out: int = 0  # objects only checked for presence and size
    missing_objects: list[str] = field(default_factory=list)  # known since the backup ran
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def __str__(self) -> str:
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        lines = [
            f"verify {self.backup_id}: {verdict}  {self.location}",
            f"  {self.files_listed} files listed, {self.checksums_verified} checksums verified, "
            f"{self.objects_decrypted} objects decrypted and matched, "
            f"{self.objects_sampled_out} only checked for size",
        ]
        if self.missing_objects:
            lines.append(f"  {len(self.missing_objects)} object(s) were already missing when "
                         f"the backup ran: {', '.join(self.missing_objects)}")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class RestoreReport:
    backup_id: str
    source: str
    database: str
    efs_root: str
    collections: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    bytes: int = 0
    links_reset: int = 0
    missing_objects: list[str] = field(default_factory=list)
    still_processing: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in self.collections.items())
        lines = [
            f"restored {self.backup_id} from {self.source}",
            f"  into      database {self.database}, EFS {self.efs_root}",
            f"  records   {counts}",
            f"  objects   {self.objects} files, {_size(self.bytes)} in {self.seconds:.1f} s",
            f"  links     {self.links_reset} stored download links dropped (re-signed on use)",
        ]
        if self.missing_objects:
            lines.append(f"  WARNING   {len(self.missing_objects)} stored document(s) have no "
                         f"file (deleted while the backup ran): "
                         f"{', '.join(self.missing_objects)}")
        if self.still_processing:
            lines.append(f"  WARNING   {self.still_processing} document(s) were still "
                         "processing at backup time; their uploads are not in the backup")
        return "\n".join(lines)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _keys_line(provider: str, keys: Iterable[KeyUse]) -> str:
    uses = ", ".join(f"{k.key_id} ({k.documents} documents)" for k in keys)
    return f"{provider}: {uses or 'no wrapped keys'} (needed to restore)"


# --------------------------------------------------------------------------- storage


class _HashingReader:
    """Passes reads through, hashing and counting the bytes: checksums cost no second pass.

    It deliberately has no ``seek``/``seekable``: boto3 then reads it strictly in order.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_COPY_BUFFER):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _safe_rel(rel: str) -> str:
    # Paths come from manifests, which a restore may not trust: never leave the backup.
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise BackupError(f"unsafe path in backup: {rel!r}")
    return rel


class _Store(ABC):
    location: str

    @abstractmethod
    def sub(self, name: str) -> _Store: ...

    @abstractmethod
    def put(self, rel: str, source: Any) -> None:
        """Stream ``source`` (has ``read``) into ``rel``; it appears complete or not at all."""

    @abstractmethod
    def put_bytes(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def open(self, rel: str) -> contextlib.AbstractContextManager[Any]:
        """A readable stream of ``rel``; FileNotFoundError when it does not exist."""

    @abstractmethod
    def get_bytes(self, rel: str) -> bytes | None: ...

    @abstractmethod
    def walk(self) -> Iterator[tuple[str, int]]:
        """Every file below, as (relative path, size)."""

    @abstractmethod
    def children(self) -> list[str]:
        """Names of the directories (prefixes) directly below."""

    def local_path(self, rel: str) -> Path | None:
        """The file itself when it is on the local file system (saves a copy)."""
        return None


class _LocalStore(_Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def sub(self, name: str) -> _LocalStore:
        return _LocalStore(self.root / _safe_rel(name))

    def _path(self, rel: str) -> Path:
        return self.root / _safe_rel(rel)

    def put(self, rel: str, source: Any) -> None:
        final = self._path(rel)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as out:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(final.parent)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.put(rel, _BytesSource(data))

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[Any]:
        with self._path(rel).open("rb") as handle:
            yield handle

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            return self._path(rel).read_bytes()
        except FileNotFoundError:
            return None

    def walk(self) -> Iterator[tuple[str, int]]:
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = Path(directory, name)
                yield path.relative_to(self.root).as_posix(), path.stat().st_size

    def children(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir()]

    def local_path(self, rel: str) -> Path | None:
        return self._path(rel)


class _BytesSource:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        n = len(self._view) if n is None or n < 0 else n
        out, self._view = self._view[:n], self._view[n:]
        return bytes(out)


class _S3Store(_Store):
    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        from boto3.s3.transfer import TransferConfig

        # Reads from a stream that cannot seek are buffered part by part: a few 8 MiB parts
        # in flight keep memory bounded whatever the size of the file.
        self.transfer = TransferConfig(multipart_chunksize=8 * 1024 * 1024, max_concurrency=4)
        self.transfer.max_in_memory_upload_chunks = 4

    def _key(self, rel: str) -> str:
        rel = _safe_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def sub(self, name: str) -> _S3Store:
        return _S3Store(self.client, self.bucket, self._key(name))

    def put(self, rel: str, source: Any) -> None:
        # S3 makes an object visible only once its upload completed: atomic by nature.
        self.client.upload_fileobj(source, self.bucket, self._key(rel), Config=self.transfer)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[Any]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
        except Exception as exc:
            if aws_error_code(exc) in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.location}/{rel}") from None
            raise
        try:
            yield body  # botocore's StreamingBody: read(n) streams from the response
        finally:
            body.close()

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            with self.open(rel) as body:
                data: bytes = body.read()
                return data
        except FileNotFoundError:
            return None

    def _pages(self, **args: Any) -> Iterator[dict[str, Any]]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, Prefix=prefix, **args)

    def walk(self) -> Iterator[tuple[str, int]]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in self._pages():
            for item in page.get("Contents", []):
                yield str(item["Key"])[cut:], int(item["Size"])

    def children(self) -> list[str]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        names = []
        for page in self._pages(Delimiter="/"):
            names += [str(p["Prefix"])[cut:].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return names


def _open_store(where: str) -> _Store:
    if where.startswith("s3://"):
        bucket, _, prefix = where[len("s3://"):].partition("/")
        if not bucket:
            raise BackupError(f"no bucket in {where!r}: expected s3://bucket/prefix")
        # Imported lazily: boto3 is slow to import and only S3 users need it. The client
        # reads the standard AWS configuration, AWS_ENDPOINT_URL(_S3) included.
        import boto3

        return _S3Store(boto3.client("s3"), bucket, prefix)
    return _LocalStore(Path(where).expanduser().absolute())


def _object_rel(doc_id: str) -> str:
    return f"efs/{Area.OBJECTS.value}/{doc_id[:2]}/{doc_id[2:4]}/{doc_id}"


def _object_id(rel: str) -> str:
    doc_id = rel.rsplit("/", 1)[-1]
    if not is_document_id(doc_id) or _object_rel(doc_id) != rel:
        raise BackupError(f"unexpected file in backup: {rel!r}")
    return doc_id


def _collections(svc: Services) -> dict[str, Collection[dict[str, Any]]]:
    return {"documents": svc.documents.col, "users": svc.users.col, "audit": svc.audit.col,
            "deliveries": svc.deliveries.col}


def _lines(source: Any) -> Iterator[bytes]:
    """The lines of a stream read in large blocks (one record can be megabytes)."""
    pending = b""
    while block := source.read(_COPY_BUFFER):
        pending += block
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line)
    if pending:
        yield pending


def _decode(line: bytes) -> dict[str, Any]:
    record = json_util.loads(line.decode("utf-8"), json_options=_JSON)
    if not isinstance(record, dict):
        raise BackupError("a backup record is not a JSON object")
    return record


def _noop(message: str) -> None:
    pass


def _load_manifest(store: _Store) -> Manifest:
    raw = store.get_bytes(MANIFEST)
    if raw is None:
        raise BackupError(f"{store.location}: no {MANIFEST}: not a backup, or an incomplete "
                          "one (a backup writes its manifest last)")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BackupError(f"{store.location}: {MANIFEST} is not valid JSON: {exc}") from None
    return Manifest.from_json(data, store.location)


# --------------------------------------------------------------------------- create


def _new_backup_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z-" + secrets.token_hex(4)


def create_backup(svc: Services, dest: str, *, progress: Progress | None = None) -> Manifest:
    """Back up the installation ``svc`` into a new ``<dest>/<backup-id>``.

    Safe while the pipeline runs (see "Consistency" in the module docstring); the files are
    streamed, never held in memory. Raises BackupError (or the storage's own error) if it
    cannot finish, leaving an incomplete backup without a manifest behind.
    """
    say = progress or _noop
    started = datetime.now(UTC)
    backup_id = _new_backup_id(started)
    store = _open_store(dest).sub(backup_id)
    say(f"backup {backup_id} to {store.location}")
    files: list[FileEntry] = []
    counts: dict[str, int] = {}
    statuses: dict[str, int] = {}
    key_uses: dict[tuple[str, str], int] = {}
    missing: list[str] = []

    with tempfile.TemporaryDirectory(prefix="docproc-backup-") as tmp:
        stored_ids = Path(tmp, "stored-ids")
        # 1. The MongoDB export: the point in time this backup represents.
        with stored_ids.open("w", encoding="ascii") as stored_out:
            for name, col in _collections(svc).items():
                export = Path(tmp, f"{name}.jsonl")
                n = 0
                with export.open("w", encoding="utf-8") as out:
                    # _id order uses the primary index, so a record updated during the scan
                    # is still read exactly once.
                    for record in col.find({}, sort=[("_id", ASCENDING)], batch_size=500):
                        out.write(json_util.dumps(record, json_options=_JSON) + "\n")
                        n += 1
                        if name == "documents":
                            _note_document(record, statuses, key_uses, stored_out)
                with export.open("rb") as exported:
                    files.append(_put_hashed(store, f"mongo/{name}.jsonl", exported))
                counts[name] = n
                say(f"exported {name}: {n} records")
        say(f"exported the database; copying {statuses.get(Status.STORED.value, 0)} objects")

        # 2. Exactly the objects the export references (ids only held on disk: flat memory).
        copied = 0
        with stored_ids.open(encoding="ascii") as ids:
            for line in ids:
                doc_id = line.strip()
                try:
                    source = svc.blobs.open(Area.OBJECTS, doc_id)
                except FileNotFoundError:
                    # Deleted (crypto-shredded) after the export: report, do not fail.
                    missing.append(doc_id)
                    say(f"object {doc_id} vanished after the export (document deleted?)")
                    continue
                with source:
                    files.append(_put_hashed(store, _object_rel(doc_id), source))
                copied += 1
                if copied % 100 == 0:
                    say(f"copied {copied} objects")
        say(f"copied {copied} objects")

    try:
        active: str | None = svc.keys.active_key_id()
    except KeyProviderError:
        active = None  # informative only: the KEKs that matter are those in keys_in_use
    manifest = Manifest(
        backup_id=backup_id,
        created_at=started,
        completed_at=datetime.now(UTC),
        key_provider=svc.keys.name,
        active_key_id=active,
        keys_in_use=[KeyUse(p, k, n) for (p, k), n in sorted(key_uses.items())],
        collections=counts,
        documents_by_status=statuses,
        files=files,
        missing_objects=missing,
        source={"mongodb_database": svc.settings.mongodb_database,
                "efs_root": str(svc.settings.efs_root)},
        location=store.location,
    )
    # Last: its presence is what marks the backup complete.
    store.put_bytes(MANIFEST, json.dumps(manifest.to_json(), indent=1).encode("utf-8"))
    say(f"backup {backup_id} complete")
    return manifest


def _note_document(record: dict[str, Any], statuses: dict[str, int],
                   key_uses: dict[tuple[str, str], int], stored_out: Any) -> None:
    status = str(record.get("status"))
    statuses[status] = statuses.get(status, 0) + 1
    wrapped = record.get("wrapped_key")
    if isinstance(wrapped, dict):
        use = (str(wrapped.get("provider")), str(wrapped.get("key_id")))
        key_uses[use] = key_uses.get(use, 0) + 1
    doc_id = record.get("_id")
    if status == Status.STORED.value and isinstance(doc_id, str) and is_document_id(doc_id):
        stored_out.write(doc_id + "\n")


def _put_hashed(store: _Store, rel: str, source: Any) -> FileEntry:
    reader = _HashingReader(source)
    store.put(rel, reader)
    return FileEntry(rel, reader.size, reader.hexdigest())


# --------------------------------------------------------------------------- list


def list_backups(dest_root: str) -> list[ManifestSummary]:
    """The backups below ``dest_root`` (directory or ``s3://bucket/prefix``), newest first.

    A backup without a readable manifest is listed with ``complete=False``.
    """
    root = _open_store(dest_root)
    summaries = []
    for name in root.children():
        match = _BACKUP_ID.fullmatch(name)
        if match is None:
            continue  # not a backup directory
        store = root.sub(name)
        started = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
        try:
            manifest = _load_manifest(store)
        except BackupError as exc:
            note = "no manifest" if store.get_bytes(MANIFEST) is None else str(exc)
            summaries.append(ManifestSummary(name, store.location, False, started, note=note))
            continue
        summaries.append(ManifestSummary(
            backup_id=manifest.backup_id, location=store.location, complete=True,
            created_at=manifest.created_at,
            documents=manifest.collections.get("documents"), objects=len(manifest.objects),
            size=manifest.total_bytes, key_provider=manifest.key_provider,
            key_ids=tuple(k.key_id for k in manifest.keys_in_use),
        ))
    summaries.sort(key=lambda s: s.backup_id, reverse=True)
    return summaries


# --------------------------------------------------------------------------- verify


def verify_backup(svc: Services, src: str, *, sample: int | None = None,
                  progress: Progress | None = None) -> VerifyReport:
    """Check the backup at ``src`` without changing anything.

    Always: every listed file is present with its size, nothing unlisted is there, every
    MongoDB export matches its checksum and record count, and every object belongs to a
    stored document. For ``sample`` objects picked at random (all when None), the object's
    checksum too, and its decryption with the data key from the backup's own record (via
    ``svc``'s key provider), whose SHA-256 and size must match that record.
    """
    say = progress or _noop
    store = _open_store(src)
    manifest = _load_manifest(store)
    report = VerifyReport(manifest.backup_id, store.location, files_listed=len(manifest.files),
                          missing_objects=list(manifest.missing_objects))
    listed = {f.path: f for f in manifest.files}
    present = dict(store.walk())
    present.pop(MANIFEST, None)
    for path, entry in listed.items():
        if path not in present:
            report.problem(path, "listed in the manifest but missing from the backup")
        elif present[path] != entry.size:
            report.problem(path, f"is {present[path]} bytes, the manifest says {entry.size}")
    for path in sorted(present.keys() - listed.keys()):
        report.problem(path, "is in the backup but not in the manifest")

    objects = {}
    for entry in manifest.objects:
        try:
            objects[_object_id(entry.path)] = entry
        except BackupError as exc:
            report.problem(entry.path, str(exc))
    chosen = set(objects) if sample is None else set(
        secrets.SystemRandom().sample(sorted(objects), min(max(sample, 0), len(objects))))
    records: dict[str, dict[str, Any]] = {}
    stored: set[str] = set()

    for name in COLLECTIONS:
        rel = f"mongo/{name}.jsonl"
        listed_export = listed.get(rel)
        if listed_export is None:
            report.problem(MANIFEST, f"does not list {rel}")
            continue
        if rel not in present:
            continue  # already reported
        try:
            with store.open(rel) as raw:
                reader = _HashingReader(raw)
                n = 0
                for line in _lines(reader):
                    n += 1
                    if name == "documents":
                        _index_document(_decode(line), chosen, records, stored)
        except (ValueError, TypeError, KeyError, BackupError) as exc:
            report.problem(rel, f"unreadable: {exc!r}")
            continue
        if reader.hexdigest() != listed_export.sha256:
            report.problem(rel, "SHA-256 does not match the manifest (altered or corrupt)")
        else:
            report.checksums_verified += 1
        if n != manifest.collections.get(name):
            report.problem(rel, f"holds {n} records, the manifest says "
                                f"{manifest.collections.get(name)}")
    say(f"checked the database exports of {manifest.backup_id}")

    for doc_id in sorted(objects.keys() - stored):
        report.problem(objects[doc_id].path, "no stored document in the backup refers to it")
    for doc_id in sorted(stored - objects.keys() - set(manifest.missing_objects)):
        report.problem(_object_rel(doc_id), f"stored document {doc_id} has no object in the "
                                            "backup")

    for doc_id in sorted(objects):
        entry = objects[doc_id]
        if doc_id not in chosen:
            report.objects_sampled_out += 1
            continue
        if entry.path not in present:
            continue  # reported above
        record = records.get(doc_id)
        if record is None:
            continue  # reported above
        if _verify_object(svc, store, entry, doc_id, record, report):
            report.objects_decrypted += 1
        done = report.objects_decrypted
        if done and done % 100 == 0:
            say(f"decrypted {done} of {len(chosen)} objects")
    say(f"verified {manifest.backup_id}: {'OK' if report.ok else 'FAILED'}")
    return report


def _index_document(record: dict[str, Any], chosen: set[str],
                    records: dict[str, dict[str, Any]], stored: set[str]) -> None:
    doc_id = record.get("_id")
    if record.get("status") != Status.STORED.value or not isinstance(doc_id, str):
        return
    stored.add(doc_id)
    if doc_id in chosen:
        # Only what the check needs, only for the sample: memory follows the sample size.
        records[doc_id] = {k: record.get(k) for k in ("wrapped_key", "sha256", "size")}


def _verify_object(svc: Services, store: _Store, entry: FileEntry, doc_id: str,
                   record: dict[str, Any], report: VerifyReport) -> bool:
    """Decrypt one object from the backup, hashing its ciphertext on the way."""
    try:
        wrapped = record.get("wrapped_key")
        if not isinstance(wrapped, dict):
            report.problem(entry.path, f"its document record {doc_id} has no data key")
            return False
        data_key = svc.keys.unwrap(WrappedKey.from_doc(wrapped), {"document_id": doc_id})
    except KeyProviderError as exc:
        report.problem(entry.path, f"cannot unwrap its data key: {exc}")
        return False
    plain = hashlib.sha256()
    size = 0
    decrypt_error: EnvelopeError | None = None
    with store.open(entry.path) as raw:
        reader = _HashingReader(raw)
        try:
            for chunk in decrypt_stream(data_key, cast(BinaryIO, reader),
                                        associated_data=doc_id.encode()):
                plain.update(chunk)
                size += len(chunk)
        except EnvelopeError as exc:
            decrypt_error = exc
        # Whatever decryption made of it, hash every stored byte: the checksum tells an
        # altered backup apart from, say, a record that does not belong to the object.
        reader.drain()
    ok = True
    if reader.hexdigest() != entry.sha256:
        report.problem(entry.path, "SHA-256 does not match the manifest (altered or corrupt)")
        ok = False
    else:
        report.checksums_verified += 1
    if decrypt_error is not None:
        report.problem(entry.path, f"does not decrypt: {decrypt_error}")
        ok = False
    elif plain.hexdigest() != record.get("sha256") or size != record.get("size"):
        report.problem(entry.path, "decrypted content does not match its document record "
                                   f"(SHA-256 {plain.hexdigest()}, {size} bytes)")
        ok = False
    return ok


# --------------------------------------------------------------------------- restore


def restore_backup(svc: Services, src: str, *,
                   progress: Progress | None = None) -> RestoreReport:
    """Restore the backup at ``src`` into the empty installation ``svc``.

    Raises RestoreRefused, having written nothing, when the target is not empty or cannot
    unwrap the backup's data keys; BackupError when a file fails its checksum (what was
    written is removed again). See "Restore" and "Keys" in the module docstring.
    """
    say = progress or _noop
    began = time.monotonic()
    store = _open_store(src)
    manifest = _load_manifest(store)
    _require_empty(svc)
    report = RestoreReport(manifest.backup_id, store.location, svc.settings.mongodb_database,
                           str(svc.settings.efs_root),
                           missing_objects=list(manifest.missing_objects),
                           still_processing=manifest.documents_by_status.get(
                               Status.PROCESSING.value, 0))
    listed = {f.path: f for f in manifest.files}
    objects = [f for f in manifest.files if f.path.startswith("efs/")]
    object_ids = [_object_id(f.path) for f in objects]  # refuse odd paths before writing

    written_objects: list[str] = []
    inserted: dict[str, list[Any]] = {name: [] for name in COLLECTIONS}
    with tempfile.TemporaryDirectory(prefix="docproc-restore-") as tmp:
        # The exports are checked whole before anything is written: a damaged backup is
        # refused up front rather than half restored.
        exports = {name: _fetch_checked(store, listed, f"mongo/{name}.jsonl", Path(tmp))
                   for name in COLLECTIONS}
        say("database exports match their checksums")
        _require_keys(svc, exports["documents"], manifest)
        try:
            for doc_id, entry in zip(object_ids, objects, strict=True):
                _restore_object(svc, store, entry, doc_id)
                written_objects.append(doc_id)
                report.bytes += entry.size
                if len(written_objects) % 100 == 0:
                    say(f"restored {len(written_objects)} of {len(objects)} objects")
            report.objects = len(written_objects)
            say(f"restored {report.objects} objects")
            cols = _collections(svc)
            for name in COLLECTIONS:
                report.collections[name] = _insert_records(
                    cols[name], exports[name], inserted[name], report,
                    drop_links=name == "documents")
                say(f"restored {name}: {report.collections[name]} records")
        except BaseException:
            _roll_back(svc, written_objects, inserted)
            raise
    for repo in (svc.documents, svc.users, svc.deliveries, svc.audit):
        repo.ensure_indexes()
    # A backup made before records carried their slots restores without them.
    svc.documents.fill_slots()
    report.seconds = time.monotonic() - began
    say(f"restore of {manifest.backup_id} complete")
    return report


def _require_empty(svc: Services) -> None:
    busy = [f"collection {name!r}" for name, col in _collections(svc).items()
            if col.find_one({}, projection={"_id": 1}) is not None]
    objects_dir = Path(svc.blobs.root, Area.OBJECTS.value)
    if any(names for _, _, names in os.walk(objects_dir)):
        busy.append(f"EFS {objects_dir}")
    if busy:
        raise RestoreRefused(
            f"restore target is not empty ({', '.join(busy)} of database "
            f"{svc.settings.mongodb_database!r} hold data): a backup is only restored into an "
            "empty installation, so that nothing is overwritten or mixed"
        )


def _fetch_checked(store: _Store, listed: dict[str, FileEntry], rel: str, tmp: Path) -> Path:
    entry = listed.get(rel)
    if entry is None:
        raise BackupError(f"{store.location}: the manifest does not list {rel}")
    local = store.local_path(rel)
    target = local if local is not None else tmp / PurePosixPath(rel).name
    try:
        with store.open(rel) as raw:
            reader = _HashingReader(raw)
            if local is None:
                with target.open("xb") as out:
                    shutil.copyfileobj(reader, out, _COPY_BUFFER)
            else:
                reader.drain()
    except FileNotFoundError:
        raise BackupError(f"{store.location}/{rel} is missing; nothing was restored") from None
    if reader.hexdigest() != entry.sha256:
        raise BackupError(f"{store.location}/{rel}: SHA-256 does not match the manifest "
                          "(altered or corrupt); nothing was restored")
    return target


def _require_keys(svc: Services, documents: Path, manifest: Manifest) -> None:
    """Unwrap one data key per KEK the backup uses, so a missing key is found up front."""
    wanted = {(k.provider, k.key_id) for k in manifest.keys_in_use}
    with documents.open("rb") as source:
        for line in _lines(source):
            if not wanted:
                return
            record = _decode(line)
            wrapped = record.get("wrapped_key")
            if not isinstance(wrapped, dict):
                continue
            use = (str(wrapped.get("provider")), str(wrapped.get("key_id")))
            if use not in wanted:
                continue
            wanted.discard(use)
            try:
                svc.keys.unwrap(WrappedKey.from_doc(wrapped), {"document_id": str(record["_id"])})
            except KeyProviderError as exc:
                hint = ("copy the original's keys directory (<data dir>/keys) into this "
                        "installation's data dir" if use[0] == "local" else
                        "give this installation kms:Decrypt on that KMS key")
                raise RestoreRefused(
                    f"this installation ({svc.keys.name} key provider) cannot unwrap the "
                    f"backup's data keys wrapped by KEK {use[1]} ({use[0]}): {exc}; {hint}"
                ) from None


def _restore_object(svc: Services, store: _Store, entry: FileEntry, doc_id: str) -> None:
    try:
        with store.open(entry.path) as raw, svc.blobs.writer(Area.OBJECTS, doc_id) as out:
            reader = _HashingReader(raw)
            shutil.copyfileobj(reader, out, _COPY_BUFFER)
            if reader.hexdigest() != entry.sha256 or reader.size != entry.size:
                # Raised inside the writer: the temporary file is removed, nothing appears.
                raise BackupError(f"{store.location}/{entry.path}: SHA-256 does not match the "
                                  "manifest (altered or corrupt); the restore was rolled back")
    except FileNotFoundError:
        raise BackupError(f"{store.location}/{entry.path} is missing from the backup; the "
                          "restore was rolled back") from None


def _insert_records(col: Collection[dict[str, Any]], export: Path, inserted: list[Any],
                    report: RestoreReport, *, drop_links: bool) -> int:
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        col.insert_many(batch, ordered=True)
        inserted.extend(r["_id"] for r in batch)
        batch.clear()

    with export.open("rb") as source:
        for line in _lines(source):
            record = _decode(line)
            if drop_links and any(k in record for k in _LINK_FIELDS):
                for key in _LINK_FIELDS:
                    record.pop(key, None)
                report.links_reset += 1
            batch.append(record)
            if len(batch) >= _INSERT_BATCH:
                flush()
    if batch:
        flush()
    return len(inserted)


def _roll_back(svc: Services, objects: list[str], inserted: dict[str, list[Any]]) -> None:
    """Remove what a failed restore wrote, so the target is empty again for the next try."""
    cols = _collections(svc)
    for name, ids in inserted.items():
        for start in range(0, len(ids), _INSERT_BATCH):
            cols[name].delete_many({"_id": {"$in": ids[start:start + _INSERT_BATCH]}})
    for doc_id in objects:
        svc.blobs.delete(Area.OBJECTS, doc_id)
