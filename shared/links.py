"""Signed, expiring download links.

A link is ``<public url>/v1/files/<id>?exp=<unix seconds>&kid=<key id>&sig=<signature>`` where
the signature is HMAC-SHA256 over the method, the path and the expiry. It proves the link was
minted by the system and is still valid; the download function also checks who is asking.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from shared.errors import ApiError

FILES_PREFIX = "/v1/files/"


@dataclass(frozen=True)
class SignedLink:
    url: str
    expires: int


class LinkSigner:
    def __init__(self, key: bytes, public_url: str) -> None:
        if len(key) < 32:
            raise ValueError("link signing key must be at least 32 bytes")
        self._key = key
        self.kid = hashlib.sha256(key).hexdigest()[:8]
        self.public_url = public_url.rstrip("/")

    def _sign(self, method: str, path: str, expires: int) -> str:
        msg = f"{method}\n{path}\n{expires}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, doc_id: str, ttl: int, now: float | None = None) -> SignedLink:
        expires = int((now if now is not None else time.time()) + ttl)
        path = FILES_PREFIX + doc_id
        sig = self._sign("GET", path, expires)
        query = urlencode({"exp": expires, "kid": self.kid, "sig": sig})
        return SignedLink(url=f"{self.public_url}{path}?{query}", expires=expires)

    def verify(self, method: str, path: str, exp: str | None, sig: str | None,
               now: float | None = None) -> None:
        if not exp or not sig or not exp.isdigit():
            raise ApiError(403, "invalid_link", "the link is not signed")
        expected = self._sign(method, path, int(exp))
        if not hmac.compare_digest(expected, sig):
            raise ApiError(403, "invalid_link", "the link signature is not valid")
        if int(exp) < (now if now is not None else time.time()):
            raise ApiError(403, "link_expired", "the link has expired; ask for a new one")


def load_link_key(configured: str | None, keys_dir: Path) -> bytes:
    """The configured key, or one generated once into the data dir (mode 0600)."""
    if configured is not None:
        return configured.encode()
    path = keys_dir / "link.key"
    if path.exists():
        return path.read_bytes().strip()
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written aside and hard-linked into place: a concurrent reader never sees a half key, and
    # of two processes starting at once exactly one key wins.
    tmp = keys_dir / f".link.key.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_urlsafe(48).encode())
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()
