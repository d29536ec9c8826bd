"""Writing a backup (create_backup) and finding the backups below a location (list_backups)."""

from __future__ import annotations

import json
import re
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bson import json_util
from pymongo import ASCENDING

from docproc.backup.errors import BackupError
from docproc.backup.manifest import (
    MANIFEST,
    FileEntry,
    KeyUse,
    Manifest,
    ManifestSummary,
    load_manifest,
)
from docproc.backup.progress import Progress, noop
from docproc.backup.records import JSON, backed_up_collections
from docproc.backup.seal import SEAL_FIELD, Sealer
from docproc.backup.stores import HashingReader, Store, object_rel, open_store
from docproc.runtime import Services
from shared.blobstore import Area
from shared.documents import Status
from shared.ids import is_document_id
from shared.keys import KeyProviderError

_BACKUP_ID: Final = re.compile(r"(\d{8}T\d{6}\.\d{3})Z-[0-9a-f]{8}")


def _new_backup_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z-" + secrets.token_hex(4)


def create_backup(svc: Services, dest: str, *, progress: Progress | None = None) -> Manifest:
    """Back up the installation ``svc`` into a new ``<dest>/<backup-id>``.

    Safe while the pipeline runs (see "Consistency" in the package docstring); the files are
    streamed, never held in memory. Raises BackupError (or the storage's own error) if it
    cannot finish, leaving an incomplete backup without a manifest behind.
    """
    say = progress or noop
    started = datetime.now(UTC)
    backup_id = _new_backup_id(started)
    store = open_store(dest).sub(backup_id)
    sealer = Sealer(svc.keys, backup_id)
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
            for name, col in backed_up_collections(svc).items():
                export = Path(tmp, f"{name}.jsonl")
                n = 0
                with export.open("w", encoding="utf-8") as out:
                    # _id order uses the primary index, so a record updated during the scan
                    # is still read exactly once.
                    for record in col.find({}, sort=[("_id", ASCENDING)], batch_size=500):
                        out.write(json_util.dumps(record, json_options=JSON) + "\n")
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
                    # Deleted (crypto-shredded) after the export: report, do not fail. A
                    # document still stored whose file is gone (a fault of the file system,
                    # a wrong mount) is lost data, which no backup may call complete.
                    now = svc.documents.get(doc_id)
                    if now is not None and now.status != Status.DELETED:
                        raise BackupError(
                            f"document {doc_id} is {now.status.value} but its object is "
                            f"missing from {svc.blobs.path(Area.OBJECTS, doc_id)}") from None
                    missing.append(doc_id)
                    say(f"object {doc_id} vanished after the export (document deleted)")
                    continue
                with source:
                    files.append(_put_hashed(store, object_rel(doc_id), source))
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
    body = manifest.to_json()
    body[SEAL_FIELD] = sealer.seal(body)
    manifest.raw = body
    # Last: its presence is what marks the backup complete.
    store.put_bytes(MANIFEST, json.dumps(body, indent=1).encode("utf-8"))
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


def _put_hashed(store: Store, rel: str, source: Any) -> FileEntry:
    reader = HashingReader(source)
    store.put(rel, reader)
    return FileEntry(rel, reader.size, reader.hexdigest())


# --------------------------------------------------------------------------- list


def list_backups(dest_root: str) -> list[ManifestSummary]:
    """The backups below ``dest_root`` (directory or ``s3://bucket/prefix``), newest first.

    A backup without a readable manifest is listed with ``complete=False``.
    """
    root = open_store(dest_root)
    summaries = []
    for name in root.children():
        match = _BACKUP_ID.fullmatch(name)
        if match is None:
            continue  # not a backup directory
        store = root.sub(name)
        started = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
        try:
            manifest = load_manifest(store)
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
