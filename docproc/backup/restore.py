"""Restoring a backup into an empty installation (restore_backup)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Final

from pymongo.collection import Collection

from docproc.backup import seal
from docproc.backup.errors import BackupError, RestoreRefused
from docproc.backup.manifest import COLLECTIONS, FileEntry, Manifest, RestoreReport, load_manifest
from docproc.backup.progress import Progress, noop
from docproc.backup.records import backed_up_collections, decode, lines
from docproc.backup.stores import COPY_BUFFER, HashingReader, Store, object_id, open_store
from docproc.runtime import Services
from shared.blobstore import Area
from shared.documents import Status
from shared.keys import KeyProviderError, WrappedKey

_INSERT_BATCH: Final = 500
# Fields derived from the source installation's public URL and link signing key.
_LINK_FIELDS: Final = ("download_url_enc", "download_url_expires")


def restore_backup(svc: Services, src: str, *, progress: Progress | None = None,
                   allow_unsealed: bool = False) -> RestoreReport:
    """Restore the backup at ``src`` into the empty installation ``svc``.

    Raises RestoreRefused, having written nothing, when the target is not empty, when the
    manifest's seal does not hold (or it has none, unless ``allow_unsealed``: backups made
    before manifests were sealed) or when the target cannot unwrap the backup's data keys;
    BackupError when a file fails its checksum (what was written is removed again). See
    "Restore" and "Keys" in the package docstring.
    """
    say = progress or noop
    began = time.monotonic()
    store = open_store(src)
    manifest = load_manifest(store)
    unsealed = _require_seal(svc, store, manifest, allow_unsealed)
    _require_empty(svc)
    report = RestoreReport(manifest.backup_id, store.location, svc.settings.mongodb_database,
                           str(svc.settings.efs_root),
                           missing_objects=list(manifest.missing_objects),
                           still_processing=manifest.documents_by_status.get(
                               Status.PROCESSING.value, 0),
                           unsealed=unsealed)
    listed = {f.path: f for f in manifest.files}
    objects = [f for f in manifest.files if f.path.startswith("efs/")]
    object_ids = [object_id(f.path) for f in objects]  # refuse odd paths before writing

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
            cols = backed_up_collections(svc)
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


def _require_seal(svc: Services, store: Store, manifest: Manifest,
                  allow_unsealed: bool) -> bool:
    """Refuse a manifest whose seal does not hold; True for an unsealed one let through."""
    try:
        seal.check(svc.keys, manifest.raw, manifest.backup_id, store.name)
    except seal.Unsealed as exc:
        if not allow_unsealed:
            raise RestoreRefused(f"{store.location}: {exc}; nothing was restored (restore it "
                                 "anyway with --allow-unsealed if you trust the copy)") from None
        return True
    except seal.KeyUnavailable as exc:
        raise RestoreRefused(f"{store.location}: {exc}; {_key_hint(exc.provider)}") from None
    except seal.SealError as exc:
        raise RestoreRefused(f"{store.location}: {exc}; nothing was restored") from None
    return False


def _key_hint(provider: str) -> str:
    return ("copy the original's keys directory (<data dir>/keys) into this installation's "
            "data dir" if provider == "local" else
            "give this installation kms:Decrypt on that KMS key")


def _require_empty(svc: Services) -> None:
    busy = [f"collection {name!r}" for name, col in backed_up_collections(svc).items()
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


def _fetch_checked(store: Store, listed: dict[str, FileEntry], rel: str, tmp: Path) -> Path:
    entry = listed.get(rel)
    if entry is None:
        raise BackupError(f"{store.location}: the manifest does not list {rel}")
    local = store.local_path(rel)
    target = local if local is not None else tmp / PurePosixPath(rel).name
    try:
        with store.open(rel) as raw:
            reader = HashingReader(raw)
            if local is None:
                with target.open("xb") as out:
                    shutil.copyfileobj(reader, out, COPY_BUFFER)
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
        for line in lines(source):
            if not wanted:
                return
            record = decode(line)
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
                raise RestoreRefused(
                    f"this installation ({svc.keys.name} key provider) cannot unwrap the "
                    f"backup's data keys wrapped by KEK {use[1]} ({use[0]}): {exc}; "
                    f"{_key_hint(use[0])}"
                ) from None


def _restore_object(svc: Services, store: Store, entry: FileEntry, doc_id: str) -> None:
    try:
        with store.open(entry.path) as raw, svc.blobs.writer(Area.OBJECTS, doc_id) as out:
            reader = HashingReader(raw)
            shutil.copyfileobj(reader, out, COPY_BUFFER)
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
        # Noted before the insert: one that fails partway has written some of the batch,
        # and the roll-back must find them (deleting an id that never went in does
        # nothing: the target was empty).
        inserted.extend(r["_id"] for r in batch)
        col.insert_many(batch, ordered=True)
        batch.clear()

    with export.open("rb") as source:
        for line in lines(source):
            record = decode(line)
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
    cols = backed_up_collections(svc)
    for name, ids in inserted.items():
        for start in range(0, len(ids), _INSERT_BATCH):
            cols[name].delete_many({"_id": {"$in": ids[start:start + _INSERT_BATCH]}})
    for doc_id in objects:
        svc.blobs.delete(Area.OBJECTS, doc_id)
