"""Streaming authenticated encryption of documents (the docproc envelope format).

A document is encrypted under a per-document 256-bit data key (see ``shared.keys``)
with AES-256-GCM in fixed-size chunks, so that encryption, decryption and random
access all work in memory proportional to the chunk size, never the document
size, and no plaintext ever has to touch the disk.

On-disk format, version 1
=========================

All integers are unsigned and big-endian.

Header, 17 bytes::

    offset  size  field
    0       5     magic         b"DPENV"
    5       1     version       u8, always 1
    6       4     chunk_size    u32, plaintext bytes per chunk, 1 .. MAX_CHUNK_SIZE
    10      7     nonce_prefix  random bytes, fresh for every envelope

Body: ``n >= 1`` chunks, back to back, no separators or lengths::

    chunk i = AES-256-GCM ciphertext of the plaintext chunk || 16-byte tag

Every chunk except the last holds exactly ``chunk_size`` plaintext bytes
(``chunk_size + 16`` bytes on disk). The last chunk holds 1..``chunk_size``
plaintext bytes; only an empty document is encoded as a single final chunk with
an empty plaintext (16 bytes on disk: just the tag). Chunk boundaries are
therefore implied by the file size alone, which is what makes random access
possible (see ``plaintext_size``).

Nonce of chunk ``i`` (12 bytes, the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár)::

    nonce_prefix (7) || i as u32 (4) || last flag (1): 0x01 for the final chunk, else 0x00

Associated data of every chunk::

    the 17 header bytes || the caller's associated_data (e.g. the document id)

Consequences: the header (version, chunk size, nonce prefix) is authenticated by
every chunk; reordered chunks fail because the index is in the nonce; a stream
cut at a chunk boundary fails because no chunk carries the final flag; data
appended after the final chunk fails because that chunk is then decrypted as a
non-final one; binding the document id in the associated data stops an envelope
from being swapped for another document's envelope encrypted under the same key.

At most 2**32 chunks fit in an envelope (the index is a u32), i.e. 256 TiB at the
default 64 KiB chunk size.

Nonce uniqueness relies on data keys being used for one envelope each (the
envelope-encryption design); the random prefix is a second line of defence should
a key ever be reused.

Streaming decryption releases each chunk only after it has been authenticated, but
a *later* chunk may still fail: consumers of ``decrypt_stream`` must treat the
output as untrusted until the iterator has finished without raising.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "TAG_SIZE",
    "Digest",
    "EnvelopeError",
    "EnvelopeReader",
    "EnvelopeWriter",
    "ciphertext_size",
    "decrypt_stream",
    "plaintext_size",
]

MAGIC: Final = b"DPENV"
FORMAT_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 64 * 1024
# The u32 field would allow 4 GiB chunks; the cap keeps a hostile header from
# making a reader allocate gigabytes for a single chunk.
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
TAG_SIZE: Final = 16
KEY_SIZE: Final = 32
NONCE_PREFIX_SIZE: Final = 7
MAX_CHUNKS: Final = 2**32

_HEADER: Final = struct.Struct(">5sBI7s")
HEADER_SIZE: Final = _HEADER.size  # 17
_NONCE_SUFFIX: Final = struct.Struct(">IB")
_FINAL: Final = 1
_NOT_FINAL: Final = 0


class EnvelopeError(Exception):
    """The data is not a valid envelope, or it failed authentication."""


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"envelope key must be {KEY_SIZE} bytes (AES-256), got {len(key)}")


def _check_chunk_size(chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}, got {chunk_size}")


def ciphertext_size(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Size in bytes of the envelope holding ``plaintext_size`` bytes."""
    _check_chunk_size(chunk_size)
    if plaintext_size < 0:
        raise ValueError(f"plaintext_size must be >= 0, got {plaintext_size}")
    chunks = max(1, -(-plaintext_size // chunk_size))
    if chunks > MAX_CHUNKS:
        raise EnvelopeError(f"{plaintext_size} bytes do not fit in one envelope")
    return HEADER_SIZE + plaintext_size + chunks * TAG_SIZE


def plaintext_size(ciphertext_size: int, chunk_size: int) -> int:
    """Inverse of ``ciphertext_size``; raises EnvelopeError if no envelope has that size."""
    _check_chunk_size(chunk_size)
    body = ciphertext_size - HEADER_SIZE
    if body < TAG_SIZE:
        raise EnvelopeError(
            f"impossible envelope size {ciphertext_size}: truncated (shorter than header + one tag)"
        )
    full = chunk_size + TAG_SIZE
    chunks = -(-body // full)
    last = body - (chunks - 1) * full
    # Only a lone chunk may be empty; a tag-only (or shorter) tail after full
    # chunks cannot be produced by the writer.
    if last < TAG_SIZE or (last == TAG_SIZE and chunks > 1):
        raise EnvelopeError(
            f"impossible envelope size {ciphertext_size} for chunk size {chunk_size}: "
            "truncated or trailing data"
        )
    if chunks > MAX_CHUNKS:
        raise EnvelopeError(f"impossible envelope size {ciphertext_size}: too many chunks")
    return body - chunks * TAG_SIZE


def _parse_header(header: bytes) -> tuple[int, bytes]:
    magic_len = min(len(header), len(MAGIC))
    if magic_len == 0 or header[:magic_len] != MAGIC[:magic_len]:
        raise EnvelopeError("not a docproc envelope (bad magic)")
    if len(header) > len(MAGIC) and header[len(MAGIC)] != FORMAT_VERSION:
        raise EnvelopeError(f"unsupported envelope version {header[len(MAGIC)]}")
    if len(header) < HEADER_SIZE:
        raise EnvelopeError(f"truncated: envelope header is {len(header)} of {HEADER_SIZE} bytes")
    _, _, chunk_size, prefix = _HEADER.unpack(header)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise EnvelopeError(f"invalid chunk size {chunk_size} in envelope header")
    return chunk_size, prefix


def _read_full(source: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, or fewer only at end of file (raw streams may return short reads)."""
    data = source.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = source.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_all(sink: BinaryIO, data: bytes) -> None:
    written = sink.write(data)
    # None comes from duck-typed sinks that do not report a count; they take it all.
    if written is None or written >= len(data):
        return
    # Raw (unbuffered) sinks may accept only part of a write.
    view = memoryview(data)[written:]
    while view:
        n = sink.write(view)
        if not n:
            raise OSError("sink accepted no data")
        view = view[n:]


class _ChunkCipher:
    """AES-GCM with the STREAM nonce layout; one instance per envelope."""

    __slots__ = ("_aad", "_aead", "_prefix")

    def __init__(self, key: bytes, header: bytes, associated_data: bytes) -> None:
        self._aead = AESGCM(key)
        self._prefix = header[-NONCE_PREFIX_SIZE:]
        self._aad = header + associated_data

    def _nonce(self, index: int, last: int) -> bytes:
        return self._prefix + _NONCE_SUFFIX.pack(index, last)

    def seal(self, index: int, final: bool, data: bytes | bytearray | memoryview) -> bytes:
        if index >= MAX_CHUNKS:
            raise EnvelopeError(f"envelope full: more than {MAX_CHUNKS} chunks")
        return self._aead.encrypt(
            self._nonce(index, _FINAL if final else _NOT_FINAL), data, self._aad
        )

    def _try_open(self, index: int, final: bool, block: bytes) -> bytes | None:
        try:
            return self._aead.decrypt(
                self._nonce(index, _FINAL if final else _NOT_FINAL), block, self._aad
            )
        except InvalidTag:
            return None

    def open(self, index: int, final: bool, block: bytes, full_block: int) -> bytes:
        """Authenticate and decrypt chunk ``index``, explaining failures where possible."""
        if len(block) < TAG_SIZE:
            raise EnvelopeError(f"truncated: chunk {index} is shorter than its tag")
        plain = self._try_open(index, final, block)
        if plain is not None:
            return plain
        # The tag fails under one flag but may verify under the other: that tells
        # a cut stream or appended bytes apart from tampering, at no cost on success.
        if self._try_open(index, not final, block) is not None:
            if final and len(block) == full_block:
                raise EnvelopeError("truncated: final chunk missing")
            if not final:
                raise EnvelopeError(f"trailing data after final chunk {index}")
        raise EnvelopeError(f"chunk {index} failed authentication")


class Digest(Protocol):
    """What the writer hashes the plaintext with (hashlib's objects qualify)."""

    def update(self, data: ReadableBuffer, /) -> None: ...
    def hexdigest(self) -> str: ...


class EnvelopeWriter:
    """Streaming encryptor: ``write`` plaintext pieces of any size, then ``close``.

    The header is written at construction. Memory use is bounded by one chunk:
    the last full chunk is held back until more data (not final) or ``close``
    (final) decides its flag. ``close`` does not close ``sink``. Used as a
    context manager, an exception inside the block leaves the envelope without a
    final chunk, so a half-written document can never pass as complete.
    """

    def __init__(
        self,
        key: bytes,
        sink: BinaryIO,
        *,
        associated_data: bytes = b"",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        digest: Digest | None = None,
        hash_plaintext: bool = True,
    ) -> None:
        _check_key(key)
        _check_chunk_size(chunk_size)
        if digest is not None and not hash_plaintext:
            # It would be left unfed, and its hexdigest would not be the document's.
            raise ValueError("a digest was given to a writer told not to hash")
        self._sink = sink
        self._chunk_size = chunk_size
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, chunk_size, os.urandom(NONCE_PREFIX_SIZE))
        self._cipher = _ChunkCipher(key, header, bytes(associated_data))
        self._buffer = bytearray()
        self._index = 0
        self._size = 0
        # ``hash_plaintext=False``: the caller hashes the pieces itself, as they arrive.
        self._hash: Digest | None = None
        if hash_plaintext:
            self._hash = digest if digest is not None else hashlib.sha256()
        self._closed = False
        _write_all(sink, header)

    @property
    def plaintext_size(self) -> int:
        """Plaintext bytes accepted so far."""
        return self._size

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def closed(self) -> bool:
        return self._closed

    def sha256_hex(self) -> str:
        """SHA-256 (hex) of the plaintext accepted so far (a ``digest`` given to the
        constructor may only give it once, when everything is written)."""
        if self._hash is None:
            raise ValueError("this writer was told not to hash (hash_plaintext=False)")
        return self._hash.hexdigest()

    def _emit(self, data: bytes | bytearray | memoryview, final: bool) -> None:
        _write_all(self._sink, self._cipher.seal(self._index, final, data))
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("write to a closed EnvelopeWriter")
        with memoryview(data) as raw, raw.cast("B") as view:
            total = len(view)
            if total == 0:
                return
            if self._hash is not None:  # first, while the piece is freshest in this core's cache
                self._hash.update(view)
            self._size += total
            chunk_size = self._chunk_size
            buffer = self._buffer
            pos = 0
            if buffer:
                pos = min(chunk_size - len(buffer), total)
                buffer += view[:pos]
                if pos == total:
                    return
                # More data follows, so the buffered full chunk is not the last one.
                self._emit(buffer, final=False)
                buffer.clear()
            # Whole chunks go straight from the caller's buffer (no copy), always
            # leaving at least one byte behind so the final chunk is never empty.
            while total - pos > chunk_size:
                self._emit(view[pos : pos + chunk_size], final=False)
                pos += chunk_size
            buffer += view[pos:]

    def close(self) -> None:
        """Emit the final chunk. Idempotent; does not close the sink."""
        if self._closed:
            return
        self._emit(self._buffer, final=True)
        self._buffer.clear()
        self._closed = True

    def _abort(self) -> None:
        self._buffer.clear()
        self._closed = True

    def __enter__(self) -> EnvelopeWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def decrypt_stream(
    key: bytes, source: BinaryIO, *, associated_data: bytes = b""
) -> Iterator[bytes]:
    """Yield the plaintext of an envelope chunk by chunk, authenticating each one.

    The header is checked immediately; chunk errors surface while iterating. The
    iterator only ends normally after the final chunk has verified and the source
    is exhausted, so a caller must discard everything it received if it raises.
    """
    _check_key(key)
    header = _read_full(source, HEADER_SIZE)
    chunk_size, _ = _parse_header(header)
    cipher = _ChunkCipher(key, header, bytes(associated_data))
    return _decrypt_chunks(cipher, source, chunk_size + TAG_SIZE)


def _decrypt_chunks(cipher: _ChunkCipher, source: BinaryIO, full_block: int) -> Iterator[bytes]:
    block = _read_full(source, full_block)
    if not block:
        raise EnvelopeError("truncated: final chunk missing")
    index = 0
    while True:
        if len(block) < full_block:
            # A short read means end of file, so this must be the final chunk.
            yield cipher.open(index, True, block, full_block)
            return
        # A full block is final only if nothing follows it: look one block ahead.
        following = _read_full(source, full_block)
        if not following:
            yield cipher.open(index, True, block, full_block)
            return
        yield cipher.open(index, False, block, full_block)
        block = following
        index += 1


class EnvelopeReader(io.RawIOBase):
    """Seekable, read-only plaintext view of an envelope in a seekable file.

    The final chunk is authenticated on construction; after that only the chunks
    covering a read are fetched and authenticated, and only the most recently
    decrypted chunk is cached. The envelope is taken to
    start at the source's current position and to run to its end. Closing the
    reader does not close the source.
    """

    def __init__(self, key: bytes, source: BinaryIO, *, associated_data: bytes = b"") -> None:
        super().__init__()
        _check_key(key)
        if not source.seekable():
            raise ValueError("EnvelopeReader needs a seekable source; use decrypt_stream instead")
        self._source = source
        self._base = source.tell()
        header = _read_full(source, HEADER_SIZE)
        self._chunk_size, _ = _parse_header(header)
        self._ciphertext_size = source.seek(0, io.SEEK_END) - self._base
        self._size = plaintext_size(self._ciphertext_size, self._chunk_size)
        self._last_index = max(1, -(-self._size // self._chunk_size)) - 1
        self._full_block = self._chunk_size + TAG_SIZE
        self._cipher = _ChunkCipher(key, header, bytes(associated_data))
        self._pos = 0
        self._cached_index = -1
        self._cached = memoryview(b"")
        # Authenticating the final chunk up front (it carries the last flag and its
        # index) proves the file is neither cut nor extended, so ``size`` can be
        # trusted and a wrong key or associated data fails here rather than mid-read.
        self._chunk(self._last_index)

    @property
    def size(self) -> int:
        """Plaintext size in bytes."""
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed EnvelopeReader")

    def _chunk(self, index: int) -> memoryview:
        if index == self._cached_index:
            return self._cached
        offset = HEADER_SIZE + index * self._full_block
        length = min(self._full_block, self._ciphertext_size - offset)
        self._source.seek(self._base + offset)
        block = _read_full(self._source, length)
        if len(block) != length:
            raise EnvelopeError(f"truncated: chunk {index} is incomplete (source changed size?)")
        plain = self._cipher.open(index, index == self._last_index, block, self._full_block)
        self._cached_index = index
        self._cached = memoryview(plain)
        return self._cached

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        self._check_open()
        with memoryview(buffer) as raw, raw.cast("B") as out:
            wanted = len(out)
            done = 0
            while done < wanted and self._pos < self._size:
                index, offset = divmod(self._pos, self._chunk_size)
                chunk = self._chunk(index)
                take = min(len(chunk) - offset, wanted - done)
                out[done : done + take] = chunk[offset : offset + take]
                done += take
                self._pos += take
            return done

    def read(self, size: int | None = -1, /) -> bytes:
        self._check_open()
        remaining = max(self._size - self._pos, 0)
        if size is None or size < 0 or size > remaining:
            size = remaining
        parts: list[memoryview] = []
        while size > 0:
            index, offset = divmod(self._pos, self._chunk_size)
            chunk = self._chunk(index)
            take = min(len(chunk) - offset, size)
            parts.append(chunk[offset : offset + take])
            size -= take
            self._pos += take
        if len(parts) == 1:
            return parts[0].tobytes()
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._pos + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._pos = position
        return position

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def close(self) -> None:
        self._cached_index = -1
        self._cached = memoryview(b"")
        super().close()
