"""Signed, expiring download links, with signing keys that can be rotated.

A link is ``<public url>/v1/files/<id>?exp=<unix seconds>&kid=<key id>&sig=<signature>``;
the signature is HMAC-SHA256 over the method, the path and the expiry. It proves the system
minted the link and that it is still valid; the download function also checks who asks.

Keys come from ``DOCPROC_LINK_KEY`` (with an optional previous key still accepted until a
given time), or from ``<data dir>/keys/link-keys.json``, generated on first use and rotated by
``docproc keys rotate-link``: links signed with the previous key keep working for a grace
period, then answer 403. Running processes see a rotation of the keyring file at their next
link, without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from shared.errors import ApiError
from shared.watched_file import WatchedFile

FILES_PREFIX = "/v1/files/"
KEYRING_FILE = "link-keys.json"
MIN_KEY_BYTES = 32
_KEYRING_MAX_BYTES = 1024 * 1024  # a few keys; far more than a keyring ever holds
# What a link's query may hold, checked before anything is parsed: the expiry in plain ASCII
# digits without leading zeros (``str.isdigit`` also takes "²", which ``int`` refuses, and
# ``int`` refuses more than 4,300 digits), and the signature as the unpadded base64url of an
# HMAC-SHA256 (``hmac.compare_digest`` refuses non-ASCII text).
_EXPIRY = re.compile(r"[1-9][0-9]{0,11}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class SignedLink:
    url: str
    expires: int


@dataclass(frozen=True)
class LinkKey:
    secret: bytes
    # Links signed with a retired key are accepted until then (unix seconds).
    accept_until: float | None = None

    @property
    def kid(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:8]


@dataclass(frozen=True)
class KeySet:
    """The keys in force: the active one signs, every one verifies what it signed."""

    active: LinkKey
    by_kid: dict[str, LinkKey]

    @classmethod
    def of(cls, keys: Sequence[LinkKey]) -> KeySet:
        if not keys:
            raise ValueError("at least one link signing key is needed")
        for key in keys:
            if len(key.secret) < MIN_KEY_BYTES:
                raise ValueError(f"link signing keys must be at least {MIN_KEY_BYTES} bytes")
        by_kid = {k.kid: k for k in keys}
        if len(by_kid) != len(keys):
            # One would hide the other's retirement time: a previous key equal to the
            # current one would retire the current one with it.
            raise ValueError("the link signing keys must differ from one another")
        return cls(keys[0], by_kid)


class KeyringFile:
    """The data dir's keyring, read again whenever the file changes: ``docproc keys
    rotate-link`` in another process takes effect here at the next link."""

    def __init__(self, keys_dir: Path) -> None:
        load_keyring(keys_dir)  # made on first use
        self._file = WatchedFile(keys_dir / KEYRING_FILE, _key_set, _KEYRING_MAX_BYTES)

    def current(self) -> KeySet:
        keys = self._file.current()
        if keys is None:
            raise FileNotFoundError(self._file.path)
        return keys


class LinkSigner:
    def __init__(self, keys: Sequence[LinkKey] | KeyringFile, public_url: str) -> None:
        self._current: Callable[[], KeySet]
        if isinstance(keys, KeyringFile):
            self._current = keys.current
        else:
            fixed = KeySet.of(keys)
            self._current = lambda: fixed
        self._current()  # refuses unusable keys now, not at the first link
        self.public_url = public_url.rstrip("/")

    @property
    def active(self) -> LinkKey:
        return self._current().active

    @property
    def kid(self) -> str:
        return self.active.kid

    def is_current(self, url: str) -> bool:
        """Whether ``url`` is a link this signer would hand out now: at its public URL and
        signed with the active key (a stored link outlives a rotation or a new host)."""
        base, _, query = url.partition("?")
        return (base.startswith(self.public_url + FILES_PREFIX)
                and parse_qs(query).get("kid") == [self.kid])

    @staticmethod
    def _sign(key: LinkKey, method: str, path: str, expires: int) -> str:
        msg = f"{method}\n{path}\n{expires}".encode()
        digest = hmac.new(key.secret, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, doc_id: str, ttl: int, now: float | None = None) -> SignedLink:
        # Rounded up: a link lives at least the ``ttl`` asked for (truncating cut up to a
        # second off, all of a one-second link).
        expires = math.ceil((now if now is not None else time.time()) + ttl)
        path = FILES_PREFIX + doc_id
        active = self.active
        sig = self._sign(active, "GET", path, expires)
        query = urlencode({"exp": expires, "kid": active.kid, "sig": sig})
        return SignedLink(url=f"{self.public_url}{path}?{query}", expires=expires)

    def verify(self, method: str, path: str, exp: str | None, sig: str | None,
               kid: str | None = None, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        if not exp or not sig:
            raise ApiError(403, "invalid_link", "the link is not signed")
        if not _EXPIRY.fullmatch(exp) or not _SIGNATURE.fullmatch(sig):
            raise ApiError(403, "invalid_link", "the link is malformed")
        keys = self._current()
        key = keys.by_kid.get(kid or keys.active.kid)
        if key is None:
            raise ApiError(403, "invalid_link", "the link was signed with an unknown key")
        if not hmac.compare_digest(self._sign(key, method, path, int(exp)), sig):
            raise ApiError(403, "invalid_link", "the link signature is not valid")
        if key.accept_until is not None and key.accept_until < now:
            raise ApiError(403, "link_key_retired",
                           "the link was signed with a retired key; ask for a new one")
        if int(exp) < now:
            raise ApiError(403, "link_expired", "the link has expired; ask for a new one")


def configured_keys(current: str | None, previous: str | None,
                    previous_until: float | None, keys_dir: Path) -> list[LinkKey] | KeyringFile:
    """The signing keys from configuration, else the data dir's keyring file."""
    if current is not None:
        keys = [LinkKey(current.encode())]
        if previous is not None:
            keys.append(LinkKey(previous.encode(), accept_until=previous_until or 0.0))
        return keys
    return KeyringFile(keys_dir)


def load_keyring(keys_dir: Path) -> list[LinkKey]:
    with _locked(keys_dir) as path:
        if not path.exists():
            _write(path, [{"secret": secrets.token_urlsafe(48), "accept_until": None}])
        return _read(path)


def rotate_keyring(keys_dir: Path, grace_seconds: float, now: float | None = None) -> LinkKey:
    """A new active key; the old active one is accepted for ``grace_seconds`` more."""
    now = now if now is not None else time.time()
    with _locked(keys_dir) as path:
        entries = json.loads(path.read_text())["keys"] if path.exists() else []
        for entry in entries:
            if entry["accept_until"] is None:
                entry["accept_until"] = now + grace_seconds
        # Keys past their grace are dropped: nothing they signed is accepted any more.
        entries = [e for e in entries if e["accept_until"] is None or e["accept_until"] > now]
        entries.insert(0, {"secret": secrets.token_urlsafe(48), "accept_until": None})
        _write(path, entries)
        return _read(path)[0]


def _read(path: Path) -> list[LinkKey]:
    return _keys(path.read_bytes())


def _keys(text: bytes) -> list[LinkKey]:
    entries = json.loads(text)["keys"]
    return [LinkKey(e["secret"].encode(), e["accept_until"]) for e in entries]


def _key_set(text: bytes) -> KeySet:
    return KeySet.of(_keys(text))


def _write(path: Path, entries: list[dict[str, object]]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"keys": entries}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(keys_dir: Path) -> Iterator[Path]:
    # Processes sharing a data dir must agree on one keyring, so creation and rotation are
    # serialised with an exclusive lock.
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (keys_dir / ".link-keys.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield keys_dir / KEYRING_FILE
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
