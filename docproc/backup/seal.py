"""The manifest's seal: an HMAC over the manifest that only the installation's KEK can make.

The manifest lists the SHA-256 of every file in the backup, so its checksums catch
corruption; but whoever can write to the backup location could edit an export *and* its
checksum. The seal closes that: a fresh 256-bit MAC key, wrapped by the key provider like a
document's data key (the KEK never leaves KMS or the keyring), authenticates the manifest,
and through its checksums every byte of the backup. Forging it takes the KEK, which a backup
location's writers do not have.

The MAC key's wrapping context names the backup id, and the check compares that id with
the backup's directory: a sealed manifest copied over another backup's is refused too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from docproc.backup.errors import BackupError
from shared.keys import KeyProvider, KeyProviderError, WrappedKey

SEAL_FIELD: Final = "seal"
_HEX_MAC: Final = re.compile(r"[0-9a-f]{64}")
_PURPOSE: Final = "docproc-backup-manifest"


class SealError(BackupError):
    """The manifest's seal does not hold."""


class Unsealed(SealError):
    """The manifest carries no seal."""


class KeyUnavailable(SealError):
    """The seal's MAC key cannot be unwrapped here: a missing KEK, or a changed context."""

    def __init__(self, message: str, provider: str) -> None:
        super().__init__(message)
        self.provider = provider


def _context(backup_id: str) -> dict[str, str]:
    return {"purpose": _PURPOSE, "backup_id": backup_id}


def _signed_bytes(body: Mapping[str, Any]) -> bytes:
    """The manifest without its seal, in one spelling whatever its file's indentation."""
    unsealed = {k: v for k, v in body.items() if k != SEAL_FIELD}
    return json.dumps(unsealed, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def _mac(key: bytes, body: Mapping[str, Any]) -> str:
    return hmac.new(key, _signed_bytes(body), hashlib.sha256).hexdigest()


class Sealer:
    """Seals one backup's manifest. Made when the backup starts, so an unreachable key
    provider stops it before any file is copied rather than after the last."""

    def __init__(self, keys: KeyProvider, backup_id: str) -> None:
        self._key, self._wrapped = keys.generate(_context(backup_id))

    def seal(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The seal to store in ``body`` under SEAL_FIELD."""
        return {
            "key": {"provider": self._wrapped.provider, "key_id": self._wrapped.key_id,
                    "blob": base64.b64encode(self._wrapped.blob).decode("ascii")},
            "hmac_sha256": _mac(self._key, body),
        }


def check(keys: KeyProvider, body: Mapping[str, Any], backup_id: str, directory: str) -> None:
    """Raise SealError unless ``body`` carries a seal made with one of ``keys``' KEKs for the
    backup ``backup_id`` stored in ``directory`` (the last part of its location)."""
    raw = body.get(SEAL_FIELD)
    if raw is None and body.get("format_version") != 1:
        # Every manifest since format 2 is written sealed: one without is a seal removed.
        raise SealError("the manifest has no seal, but its format (version "
                        f"{body.get('format_version')!r}) always has one: it was removed")
    if raw is None:
        raise Unsealed("the manifest is not sealed (made before docproc sealed its manifests, "
                        "or its seal was removed): its checksums catch corruption but not "
                        "deliberate changes")
    if directory != backup_id:
        raise SealError(f"the manifest is of backup {backup_id}, but it lies in {directory!r}: "
                        "a manifest copied over another backup's")
    try:
        key = raw["key"]
        wrapped = WrappedKey.from_doc({"provider": key["provider"], "key_id": key["key_id"],
                                       "blob": base64.b64decode(key["blob"], validate=True)})
        expected = raw["hmac_sha256"]
        if not isinstance(expected, str) or not _HEX_MAC.fullmatch(expected):
            raise ValueError("hmac_sha256 is not 64 hexadecimal digits")
    except (KeyError, TypeError, ValueError, binascii.Error, KeyProviderError) as exc:
        raise SealError(f"the manifest's seal is malformed: {exc}") from None
    try:
        mac_key = keys.unwrap(wrapped, _context(backup_id))
    except KeyProviderError as exc:
        # The local keyring and KMS both authenticate the context: an edited backup id or
        # a re-used seal fails here rather than at the MAC.
        raise KeyUnavailable(f"the manifest's seal cannot be checked with KEK "
                             f"{wrapped.key_id} ({wrapped.provider}): that KEK is not "
                             f"available here, or the manifest's backup id was changed "
                             f"({exc})", wrapped.provider) from None
    if not hmac.compare_digest(_mac(mac_key, body), expected):
        raise SealError("the manifest does not match its seal: it was changed after the "
                        "backup was made")
