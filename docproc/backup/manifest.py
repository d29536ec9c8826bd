"""The manifest of a backup, the summaries and reports the operations return, and the format
constants."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from docproc.backup.errors import BackupError
from docproc.backup.stores import Store

FORMAT: Final = "docproc-backup"
# 2: the manifest carries a seal (docproc/backup/seal.py); 1 had none.
FORMAT_VERSION: Final = 2
# Export order matters for consistency: see the package docstring.
COLLECTIONS: Final = ("documents", "users", "audit", "deliveries")
MANIFEST: Final = "manifest.json"


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
    # The file's JSON as read (or written, seal included): what the seal authenticates.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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
                raw=data,
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
    sealed: bool = False  # the manifest's seal held: no checksum in it was forged

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
        if self.sealed:
            lines.append("  the manifest's seal holds: its checksums are the backup's own")
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
    unsealed: bool = False  # restored from a manifest without a seal, as asked

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
        if self.unsealed:
            lines.append("  WARNING   the backup's manifest had no seal: nothing showed that "
                         "its checksums were not changed")
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


def load_manifest(store: Store) -> Manifest:
    raw = store.get_bytes(MANIFEST)
    if raw is None:
        raise BackupError(f"{store.location}: no {MANIFEST}: not a backup, or an incomplete "
                          "one (a backup writes its manifest last)")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BackupError(f"{store.location}: {MANIFEST} is not valid JSON: {exc}") from None
    return Manifest.from_json(data, store.location)
