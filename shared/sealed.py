"""Small values sealed under a document's data key (AES-256-GCM), such as its download link.

Sealing a field with the document's own key means the field dies with the key when a
document is crypto-shredded, and a copy of the database alone reveals nothing.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"\x01"


class SealError(Exception):
    pass


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(12)
    return VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, VERSION + context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    if len(sealed) < 29 or sealed[:1] != VERSION:
        raise SealError("not a sealed value")
    try:
        return AESGCM(key).decrypt(sealed[1:13], sealed[13:], VERSION + context)
    except InvalidTag as exc:
        raise SealError("sealed value failed authentication") from exc
