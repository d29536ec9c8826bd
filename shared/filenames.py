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
# Controls, format characters, surrogates, private use, unassigned, and the line and
# paragraph separators (U+2028, U+2029), which break a name shown on one line.
_DROPPED = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
# What some systems take for a path separator: Windows' "best fit" turns the fullwidth
# solidus and reverse solidus into / and \\.
_SEPARATORS = str.maketrans({c: "/" for c in "\\\uff0f\uff3c\u2215\u2044\u29f8"})
# Characters Windows refuses in a file name, and the device names it reserves.
_WINDOWS = str.maketrans({c: "_" for c in '<>:"|?*'})
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{n}" for d in ("COM", "LPT") for n in range(10))}


def clean_filename(raw: str | None) -> str:
    if not raw:
        return DEFAULT_FILENAME
    name = unicodedata.normalize("NFC", unquote(raw))
    name = name.translate(_SEPARATORS).rsplit("/", 1)[-1]
    name = "".join(
        ch for ch in name if ch not in _BIDI and unicodedata.category(ch) not in _DROPPED
    ).translate(_WINDOWS).strip().rstrip(". ")
    if name.startswith(".") and "." not in name.lstrip("."):
        name = DEFAULT_FILENAME + "." + name.lstrip(".")  # ".pdf": an extension alone
    name = name.lstrip(".")
    if name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
        name = "_" + name
    if len(name.encode()) > MAX_FILENAME_BYTES:
        # keep a short extension while trimming, so a long "report….pdf" stays a .pdf
        stem, dot, ext = name.rpartition(".")
        suffix = "." + ext if dot and stem and 0 < len(ext) <= 10 else ""
        base = stem if suffix else name
        budget = MAX_FILENAME_BYTES - len(suffix.encode())
        name = base.encode()[:budget].decode("utf-8", "ignore") + suffix
    return name or DEFAULT_FILENAME
