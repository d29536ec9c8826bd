"""Where backups are kept: a local directory or an S3 prefix behind one interface, and the
paths of the objects in a backup."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Final

from docproc.backup.errors import BackupError
from shared.aws_backup import aws_error_code
from shared.blobstore import Area, fsync_dir
from shared.ids import is_document_id

COPY_BUFFER: Final = 1024 * 1024


class HashingReader:
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
        while self.read(COPY_BUFFER):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _safe_rel(rel: str) -> str:
    # Paths come from manifests, which a restore may not trust: never leave the backup.
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise BackupError(f"unsafe path in backup: {rel!r}")
    return rel


class Store(ABC):
    location: str

    @property
    @abstractmethod
    def name(self) -> str:
        """The last part of the location: a backup's id, for one backup's store."""

    @abstractmethod
    def sub(self, name: str) -> Store: ...

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


class _LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    @property
    def name(self) -> str:
        return self.root.resolve().name  # "." or "backups/x/" name their directory too

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
                shutil.copyfileobj(source, out, COPY_BUFFER)
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


class _S3Store(Store):
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

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]

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


def open_store(where: str) -> Store:
    if where.startswith("s3://"):
        bucket, _, prefix = where[len("s3://"):].partition("/")
        if not bucket:
            raise BackupError(f"no bucket in {where!r}: expected s3://bucket/prefix")
        # Imported lazily: boto3 is slow to import and only S3 users need it. The client
        # reads the standard AWS configuration, AWS_ENDPOINT_URL(_S3) included.
        import boto3

        return _S3Store(boto3.client("s3"), bucket, prefix)
    return _LocalStore(Path(where).expanduser().absolute())


def object_rel(doc_id: str) -> str:
    return f"efs/{Area.OBJECTS.value}/{doc_id[:2]}/{doc_id[2:4]}/{doc_id}"


def object_id(rel: str) -> str:
    doc_id = rel.rsplit("/", 1)[-1]
    if not is_document_id(doc_id) or object_rel(doc_id) != rel:
        raise BackupError(f"unexpected file in backup: {rel!r}")
    return doc_id
