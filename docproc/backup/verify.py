"""Checking a backup without changing anything (verify_backup)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, BinaryIO, cast

from docproc.backup import seal
from docproc.backup.errors import BackupError
from docproc.backup.manifest import COLLECTIONS, MANIFEST, FileEntry, VerifyReport, load_manifest
from docproc.backup.progress import Progress, noop
from docproc.backup.records import decode, lines
from docproc.backup.stores import HashingReader, Store, object_id, object_rel, open_store
from docproc.runtime import Services
from shared.documents import Status
from shared.envelope import EnvelopeError, decrypt_stream
from shared.keys import KeyProviderError, WrappedKey


def verify_backup(svc: Services, src: str, *, sample: int | None = None,
                  progress: Progress | None = None) -> VerifyReport:
    """Check the backup at ``src`` without changing anything.

    Always: every listed file is present with its size, nothing unlisted is there, every
    MongoDB export matches its checksum and record count, and every object belongs to a
    stored document. For ``sample`` objects picked at random (all when None), the object's
    checksum too, and its decryption with the data key from the backup's own record (via
    ``svc``'s key provider), whose SHA-256 and size must match that record.
    """
    say = progress or noop
    store = open_store(src)
    manifest = load_manifest(store)
    report = VerifyReport(manifest.backup_id, store.location, files_listed=len(manifest.files),
                          missing_objects=list(manifest.missing_objects))
    try:
        seal.check(svc.keys, manifest.raw, manifest.backup_id, store.name)
        report.sealed = True
    except seal.SealError as exc:
        # The checks below still run: they tell corruption apart from a forged manifest.
        report.problem(MANIFEST, str(exc))
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
            objects[object_id(entry.path)] = entry
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
                reader = HashingReader(raw)
                n = 0
                for line in lines(reader):
                    n += 1
                    if name == "documents":
                        _index_document(decode(line), chosen, records, stored)
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
        report.problem(object_rel(doc_id), f"stored document {doc_id} has no object in the "
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


def _verify_object(svc: Services, store: Store, entry: FileEntry, doc_id: str,
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
        reader = HashingReader(raw)
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
