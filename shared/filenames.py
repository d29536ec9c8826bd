"""Client-supplied file names, made safe to store and to echo back.

A file name is only ever metadata here (paths come from generated ids), but it is shown in
apps and put into Content-Disposition, so it is reduced to a plain, printable base name.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote

MAX_FILENAME_BYTES = 255
DEFAULT_FILENAME = "document"
# Bidirectional overrides and isolates can make "gpj.exe" read as "exe.jpg".
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)}


def clean_filename(raw: str | None) -> str:
    if not raw:
        return DEFAULT_FILENAME
    name = unicodedata.normalize("NFC", unquote(raw))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        ch for ch in name
        if ch not in _BIDI and unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn")
    ).strip().lstrip(".")
    if len(name.encode()) > MAX_FILENAME_BYTES:
        # keep a short extension while trimming, so a long "report….pdf" stays a .pdf
        stem, dot, ext = name.rpartition(".")
        suffix = "." + ext if dot and stem and 0 < len(ext) <= 10 else ""
        base = stem if suffix else name
        budget = MAX_FILENAME_BYTES - len(suffix.encode())
        name = base.encode()[:budget].decode("utf-8", "ignore") + suffix
    return name or DEFAULT_FILENAME
