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
(``format_version`` 2) lists every file with its size and the SHA-256 of its stored bytes,
the record count of each collection, the documents per status, the start and end times, the
objects that vanished while the backup ran, and the key provider and key-encryption keys
(KEKs) that wrap the documents' data keys. Its ``seal`` is an HMAC-SHA256 of the rest, under
a key wrapped by the active KEK for this backup id (``docproc/backup/seal.py``): the
checksums catch corruption, the seal a deliberate change to a file and its checksum alike.
Verify reports, and restore refuses, a manifest whose seal does not hold, that lies in
another backup's directory, or that has none (format 1; ``allow_unsealed`` restores it).

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

from docproc.backup.create import create_backup, list_backups
from docproc.backup.errors import BackupError, RestoreRefused
from docproc.backup.manifest import (
    COLLECTIONS,
    FORMAT_VERSION,
    FileEntry,
    KeyUse,
    Manifest,
    ManifestSummary,
    Problem,
    RestoreReport,
    VerifyReport,
)
from docproc.backup.manifest import FORMAT as FORMAT
from docproc.backup.manifest import MANIFEST as MANIFEST
from docproc.backup.progress import Progress as Progress
from docproc.backup.restore import restore_backup
from docproc.backup.verify import verify_backup

# FORMAT, MANIFEST and Progress (imported "as" themselves above) are public names of the
# former single module outside __all__: they stay importable from here.
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
