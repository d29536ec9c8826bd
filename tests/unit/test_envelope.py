"""Tests for the streaming envelope format (shared.envelope)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import pytest

from shared.envelope import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    EnvelopeError,
    EnvelopeReader,
    EnvelopeWriter,
    ciphertext_size,
    decrypt_stream,
    plaintext_size,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DOC_ID = b"doc-0123456789abcdef"
PATTERN = b"CONFIDENTIAL-DELIVERY-NOTE-"


def pattern(size: int) -> bytes:
    """A recognisable plaintext, so any leak into the ciphertext is easy to spot."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def encrypt(
    plaintext: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key: bytes = KEY,
    associated_data: bytes = DOC_ID,
    piece: int | None = None,
) -> bytes:
    sink = io.BytesIO()
    writer = EnvelopeWriter(key, sink, associated_data=associated_data, chunk_size=chunk_size)
    if piece is None:
        writer.write(plaintext)
    else:
        for start in range(0, len(plaintext), piece):
            writer.write(plaintext[start : start + piece])
    writer.close()
    return sink.getvalue()


def decrypt(ciphertext: bytes, *, key: bytes = KEY, associated_data: bytes = DOC_ID) -> bytes:
    return b"".join(decrypt_stream(key, io.BytesIO(ciphertext), associated_data=associated_data))


def chunk_bounds(ciphertext: bytes, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) offsets of every chunk in an envelope."""
    full = chunk_size + TAG_SIZE
    return [
        (start, min(start + full, len(ciphertext)))
        for start in range(HEADER_SIZE, len(ciphertext), full)
    ]


def flip(data: bytes, offset: int) -> bytes:
    mutable = bytearray(data)
    mutable[offset] ^= 0x01
    return bytes(mutable)


def sizes_for(chunk_size: int) -> list[int]:
    return [0, 1, chunk_size - 1, chunk_size, chunk_size + 1, 3 * chunk_size, 5 * chunk_size + 7]


ROUND_TRIP_CASES = [(cs, n) for cs in (16, 1024) for n in sizes_for(cs)]


class TestRoundTrip:
    @pytest.mark.parametrize(("chunk_size", "size"), ROUND_TRIP_CASES)
    def test_single_write(self, chunk_size: int, size: int) -> None:
        plaintext = random_bytes(size, seed=size)
        ciphertext = encrypt(plaintext, chunk_size=chunk_size)
        assert len(ciphertext) == ciphertext_size(size, chunk_size)
        assert decrypt(ciphertext) == plaintext

    @pytest.mark.parametrize(("chunk_size", "size"), ROUND_TRIP_CASES)
    @pytest.mark.parametrize("piece", [1, 7, 16, 1000])
    def test_many_small_writes(self, chunk_size: int, size: int, piece: int) -> None:
        plaintext = random_bytes(size, seed=size)
        ciphertext = encrypt(plaintext, chunk_size=chunk_size, piece=piece)
        # Chunking must not depend on how the caller slices its writes.
        assert len(ciphertext) == ciphertext_size(size, chunk_size)
        assert decrypt(ciphertext) == plaintext

    def test_default_chunk_size_multi_mib(self) -> None:
        plaintext = os.urandom(3 * 1024 * 1024 + 12345)
        ciphertext = encrypt(plaintext, piece=100_000)
        assert ciphertext[: len(MAGIC)] == MAGIC
        assert len(ciphertext) == ciphertext_size(len(plaintext))
        assert decrypt(ciphertext) == plaintext

    def test_empty_is_header_plus_one_tag(self) -> None:
        ciphertext = encrypt(b"", chunk_size=16)
        assert len(ciphertext) == HEADER_SIZE + TAG_SIZE
        assert list(decrypt_stream(KEY, io.BytesIO(ciphertext), associated_data=DOC_ID)) == [b""]

    def test_decrypt_yields_chunk_sized_pieces(self) -> None:
        plaintext = pattern(16 * 3 + 5)
        pieces = list(
            decrypt_stream(
                KEY, io.BytesIO(encrypt(plaintext, chunk_size=16)), associated_data=DOC_ID
            )
        )
        assert [len(p) for p in pieces] == [16, 16, 16, 5]

    def test_memoryview_and_bytearray_writes(self) -> None:
        plaintext = pattern(5000)
        sink = io.BytesIO()
        writer = EnvelopeWriter(KEY, sink, associated_data=DOC_ID, chunk_size=1024)
        writer.write(memoryview(plaintext)[:2500])
        writer.write(bytearray(plaintext[2500:]))
        writer.close()
        assert decrypt(sink.getvalue()) == plaintext

    def test_header_layout(self) -> None:
        ciphertext = encrypt(b"x", chunk_size=1024)
        magic, version, chunk_size = struct.unpack(">5sBI", ciphertext[:10])
        assert (magic, version, chunk_size) == (b"DPENV", 1, 1024)
        assert HEADER_SIZE == 17

    def test_nonce_prefix_is_fresh_per_envelope(self) -> None:
        first, second = encrypt(b"same", chunk_size=16), encrypt(b"same", chunk_size=16)
        assert first[10:HEADER_SIZE] != second[10:HEADER_SIZE]
        assert first != second


class TestConfidentiality:
    def test_ciphertext_never_contains_plaintext(self) -> None:
        plaintext = pattern(100_000)
        for chunk_size in (16, 1024, DEFAULT_CHUNK_SIZE):
            ciphertext = encrypt(plaintext, chunk_size=chunk_size)
            assert PATTERN not in ciphertext
            assert PATTERN[:8] not in ciphertext

    def test_writer_does_not_close_sink(self) -> None:
        sink = io.BytesIO()
        writer = EnvelopeWriter(KEY, sink, chunk_size=16)
        writer.write(b"abc")
        writer.close()
        assert not sink.closed


class TestWriter:
    def test_sha256_and_size_match_input(self) -> None:
        plaintext = random_bytes(70_001, seed=3)
        writer = EnvelopeWriter(KEY, io.BytesIO(), chunk_size=1024)
        for start in range(0, len(plaintext), 999):
            writer.write(plaintext[start : start + 999])
        writer.close()
        assert writer.plaintext_size == len(plaintext)
        assert writer.sha256_hex() == hashlib.sha256(plaintext).hexdigest()

    def test_sha256_of_empty(self) -> None:
        writer = EnvelopeWriter(KEY, io.BytesIO())
        writer.close()
        assert writer.plaintext_size == 0
        assert writer.sha256_hex() == hashlib.sha256(b"").hexdigest()

    def test_header_written_immediately(self) -> None:
        sink = io.BytesIO()
        EnvelopeWriter(KEY, sink, chunk_size=16)
        assert len(sink.getvalue()) == HEADER_SIZE

    def test_holds_back_last_full_chunk_until_close(self) -> None:
        sink = io.BytesIO()
        writer = EnvelopeWriter(KEY, sink, chunk_size=16)
        writer.write(pattern(32))
        # Chunk 0 is known not to be last; chunk 1 may still be final.
        assert len(sink.getvalue()) == HEADER_SIZE + 16 + TAG_SIZE
        writer.close()
        assert len(sink.getvalue()) == HEADER_SIZE + 2 * (16 + TAG_SIZE)

    def test_close_is_idempotent(self) -> None:
        sink = io.BytesIO()
        writer = EnvelopeWriter(KEY, sink, associated_data=DOC_ID, chunk_size=16)
        writer.write(b"hello")
        writer.close()
        size = len(sink.getvalue())
        writer.close()
        assert len(sink.getvalue()) == size
        assert decrypt(sink.getvalue()) == b"hello"

    def test_write_after_close_fails(self) -> None:
        writer = EnvelopeWriter(KEY, io.BytesIO())
        writer.close()
        with pytest.raises(ValueError, match="closed"):
            writer.write(b"x")

    def test_context_manager_finalises(self) -> None:
        sink = io.BytesIO()
        with EnvelopeWriter(KEY, sink, associated_data=DOC_ID, chunk_size=16) as writer:
            writer.write(pattern(40))
        assert decrypt(sink.getvalue()) == pattern(40)

    def test_exception_in_context_leaves_envelope_unfinished(self) -> None:
        sink = io.BytesIO()

        def upload() -> None:
            with EnvelopeWriter(KEY, sink, associated_data=DOC_ID, chunk_size=16) as writer:
                writer.write(pattern(40))
                raise RuntimeError("upload aborted")

        with pytest.raises(RuntimeError, match="upload aborted"):
            upload()
        with pytest.raises(EnvelopeError, match="truncated: final chunk missing"):
            decrypt(sink.getvalue())

    @pytest.mark.parametrize("key", [b"", bytes(16), bytes(24), bytes(33)])
    def test_rejects_non_256_bit_keys(self, key: bytes) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            EnvelopeWriter(key, io.BytesIO())

    @pytest.mark.parametrize("chunk_size", [0, -1, 2**32])
    def test_rejects_bad_chunk_size(self, chunk_size: int) -> None:
        with pytest.raises(ValueError, match="chunk_size"):
            EnvelopeWriter(KEY, io.BytesIO(), chunk_size=chunk_size)


class TestAuthentication:
    CHUNK = 16

    def envelope(self) -> tuple[bytes, bytes]:
        plaintext = pattern(self.CHUNK * 5 + 3)  # six chunks, the last one short
        return plaintext, encrypt(plaintext, chunk_size=self.CHUNK)

    def test_wrong_key(self) -> None:
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError, match="chunk 0 failed authentication"):
            decrypt(ciphertext, key=OTHER_KEY)

    def test_wrong_associated_data(self) -> None:
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError, match="chunk 0 failed authentication"):
            decrypt(ciphertext, associated_data=b"doc-someone-else")

    def test_missing_associated_data(self) -> None:
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError, match="failed authentication"):
            decrypt(ciphertext, associated_data=b"")

    @pytest.mark.parametrize("chunk", [1, 2, 3, 4])
    @pytest.mark.parametrize("where", ["first", "middle", "tag"])
    def test_flipped_byte_names_the_chunk(self, chunk: int, where: str) -> None:
        _, ciphertext = self.envelope()
        start, end = chunk_bounds(ciphertext, self.CHUNK)[chunk]
        offset = {"first": start, "middle": (start + end) // 2, "tag": end - 1}[where]
        with pytest.raises(EnvelopeError, match=f"chunk {chunk} failed authentication"):
            decrypt(flip(ciphertext, offset))

    def test_earlier_chunks_are_released_before_the_bad_one(self) -> None:
        plaintext, ciphertext = self.envelope()
        start, _ = chunk_bounds(ciphertext, self.CHUNK)[3]
        stream = decrypt_stream(KEY, io.BytesIO(flip(ciphertext, start)), associated_data=DOC_ID)
        received = [next(stream), next(stream), next(stream)]
        assert b"".join(received) == plaintext[: 3 * self.CHUNK]
        with pytest.raises(EnvelopeError, match="chunk 3 failed authentication"):
            next(stream)

    @pytest.mark.parametrize("offset", [10, 12, 16])
    def test_flipped_header_byte(self, offset: int) -> None:
        # The nonce prefix is in the nonce and the whole header in the associated data.
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError, match="chunk 0 failed authentication"):
            decrypt(flip(ciphertext, offset))

    def test_swapped_chunks(self) -> None:
        _, ciphertext = self.envelope()
        bounds = chunk_bounds(ciphertext, self.CHUNK)
        (s1, e1), (s2, e2) = bounds[1], bounds[2]
        swapped = ciphertext[:s1] + ciphertext[s2:e2] + ciphertext[s1:e1] + ciphertext[e2:]
        assert len(swapped) == len(ciphertext)
        with pytest.raises(EnvelopeError, match="chunk 1 failed authentication"):
            decrypt(swapped)

    def test_dropped_middle_chunk(self) -> None:
        _, ciphertext = self.envelope()
        s, e = chunk_bounds(ciphertext, self.CHUNK)[2]
        with pytest.raises(EnvelopeError, match="chunk 2 failed authentication"):
            decrypt(ciphertext[:s] + ciphertext[e:])

    @pytest.mark.parametrize("keep", [1, 2, 5])
    def test_truncated_at_chunk_boundary(self, keep: int) -> None:
        _, ciphertext = self.envelope()
        _, end = chunk_bounds(ciphertext, self.CHUNK)[keep - 1]
        with pytest.raises(EnvelopeError, match="truncated: final chunk missing"):
            decrypt(ciphertext[:end])

    def test_header_only(self) -> None:
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError, match="truncated: final chunk missing"):
            decrypt(ciphertext[:HEADER_SIZE])

    @pytest.mark.parametrize("cut", [1, 5, TAG_SIZE, TAG_SIZE + 1])
    def test_truncated_inside_a_chunk(self, cut: int) -> None:
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError):
            decrypt(ciphertext[:-cut])

    @pytest.mark.parametrize("extra", [b"\x00", b"garbage", bytes(16), bytes(16 + TAG_SIZE)])
    def test_appended_bytes(self, extra: bytes) -> None:
        _, ciphertext = self.envelope()
        with pytest.raises(EnvelopeError):
            decrypt(ciphertext + extra)

    def test_appended_after_full_final_chunk_is_named(self) -> None:
        ciphertext = encrypt(pattern(self.CHUNK * 3), chunk_size=self.CHUNK)
        with pytest.raises(EnvelopeError, match="trailing data after final chunk 2"):
            decrypt(ciphertext + b"x")

    def test_appended_copy_of_a_chunk(self) -> None:
        ciphertext = encrypt(pattern(self.CHUNK * 3), chunk_size=self.CHUNK)
        s, e = chunk_bounds(ciphertext, self.CHUNK)[1]
        with pytest.raises(EnvelopeError):
            decrypt(ciphertext + ciphertext[s:e])

    def test_empty_envelope_tampered(self) -> None:
        ciphertext = encrypt(b"", chunk_size=self.CHUNK)
        with pytest.raises(EnvelopeError, match="chunk 0 failed authentication"):
            decrypt(flip(ciphertext, len(ciphertext) - 1))


class TestHeaderErrors:
    def test_bad_magic(self) -> None:
        ciphertext = encrypt(b"hello", chunk_size=16)
        with pytest.raises(EnvelopeError, match="not a docproc envelope"):
            decrypt(b"XPENV" + ciphertext[5:])

    @pytest.mark.parametrize("data", [b"", b"%PDF-1.7\n", b"D"])
    def test_not_an_envelope(self, data: bytes) -> None:
        if data == b"D":
            # A single correct magic byte is a truncated header, not a foreign file.
            with pytest.raises(EnvelopeError, match="truncated"):
                decrypt(data)
        else:
            with pytest.raises(EnvelopeError, match="not a docproc envelope"):
                decrypt(data)

    def test_bad_version(self) -> None:
        ciphertext = bytearray(encrypt(b"hello", chunk_size=16))
        ciphertext[5] = 9
        with pytest.raises(EnvelopeError, match="unsupported envelope version 9"):
            decrypt(bytes(ciphertext))

    def test_truncated_header(self) -> None:
        ciphertext = encrypt(b"hello", chunk_size=16)
        with pytest.raises(EnvelopeError, match="truncated"):
            decrypt(ciphertext[: HEADER_SIZE - 1])

    @pytest.mark.parametrize("chunk_size", [0, 2**32 - 1])
    def test_bad_chunk_size_in_header(self, chunk_size: int) -> None:
        ciphertext = bytearray(encrypt(b"hello", chunk_size=16))
        ciphertext[6:10] = struct.pack(">I", chunk_size)
        with pytest.raises(EnvelopeError, match=f"invalid chunk size {chunk_size}"):
            decrypt(bytes(ciphertext))

    def test_header_errors_surface_before_iteration(self) -> None:
        with pytest.raises(EnvelopeError, match="not a docproc envelope"):
            decrypt_stream(KEY, io.BytesIO(b"nope" * 10))

    def test_reader_bad_magic_and_version(self) -> None:
        ciphertext = encrypt(b"hello", chunk_size=16)
        with pytest.raises(EnvelopeError, match="not a docproc envelope"):
            EnvelopeReader(KEY, io.BytesIO(b"XXXXX" + ciphertext[5:]))
        bad_version = ciphertext[:5] + b"\x02" + ciphertext[6:]
        with pytest.raises(EnvelopeError, match="unsupported envelope version 2"):
            EnvelopeReader(KEY, io.BytesIO(bad_version))


class TestSizes:
    @pytest.mark.parametrize(("chunk_size", "size"), ROUND_TRIP_CASES)
    def test_size_functions_agree_with_files(self, chunk_size: int, size: int) -> None:
        ciphertext = encrypt(pattern(size), chunk_size=chunk_size)
        assert ciphertext_size(size, chunk_size) == len(ciphertext)
        assert plaintext_size(len(ciphertext), chunk_size) == size

    def test_inverse_over_a_range(self) -> None:
        for chunk_size in (1, 2, 16, 1024):
            for size in range(0, 5 * chunk_size + 3):
                assert plaintext_size(ciphertext_size(size, chunk_size), chunk_size) == size

    def test_default_chunk_size(self) -> None:
        size = 10 * 1024 * 1024 + 1
        assert ciphertext_size(size) == HEADER_SIZE + size + 161 * TAG_SIZE

    @pytest.mark.parametrize(
        "ciphertext_len",
        [
            0,
            HEADER_SIZE,
            HEADER_SIZE + TAG_SIZE - 1,
            # A tag-only tail after a full chunk: the writer never makes an empty last chunk.
            HEADER_SIZE + (16 + TAG_SIZE) + TAG_SIZE,
            HEADER_SIZE + 2 * (16 + TAG_SIZE) + 5,
        ],
    )
    def test_impossible_sizes(self, ciphertext_len: int) -> None:
        with pytest.raises(EnvelopeError, match="impossible envelope size"):
            plaintext_size(ciphertext_len, 16)

    def test_every_possible_size_is_accepted(self) -> None:
        valid = {ciphertext_size(n, 16) for n in range(0, 200)}
        for length in range(0, max(valid)):
            if length in valid:
                plaintext_size(length, 16)
            else:
                with pytest.raises(EnvelopeError):
                    plaintext_size(length, 16)

    def test_negative_plaintext_size(self) -> None:
        with pytest.raises(ValueError, match="plaintext_size"):
            ciphertext_size(-1)


class CountingReader(io.BytesIO):
    """Records how many ciphertext bytes a consumer actually fetched."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


class TestReader:
    CHUNK = 1024

    @pytest.fixture
    def plaintext(self) -> bytes:
        return random_bytes(self.CHUNK * 7 + 123, seed=7)

    @pytest.fixture
    def reader(self, plaintext: bytes) -> EnvelopeReader:
        ciphertext = encrypt(plaintext, chunk_size=self.CHUNK)
        return EnvelopeReader(KEY, io.BytesIO(ciphertext), associated_data=DOC_ID)

    def test_properties(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        assert reader.readable()
        assert reader.seekable()
        assert not reader.writable()
        assert reader.size == len(plaintext)
        assert reader.tell() == 0

    def test_read_all(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        assert reader.read() == plaintext
        assert reader.read() == b""
        assert reader.read(10) == b""
        reader.seek(0)
        assert reader.readall() == plaintext

    def test_random_seeks_and_reads(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        rng = random.Random(42)
        for _ in range(500):
            offset = rng.randrange(0, len(plaintext) + 50)
            length = rng.choice([0, 1, 5, self.CHUNK - 1, self.CHUNK, self.CHUNK + 1, 3000])
            assert reader.seek(offset) == offset
            assert reader.read(length) == plaintext[offset : offset + length]
            assert reader.tell() == offset + len(plaintext[offset : offset + length])

    @pytest.mark.parametrize("boundary", [1, 2, 6, 7])
    def test_reads_across_chunk_boundaries(
        self, reader: EnvelopeReader, plaintext: bytes, boundary: int
    ) -> None:
        at = boundary * self.CHUNK
        reader.seek(at - 3)
        assert reader.read(6) == plaintext[at - 3 : at + 3]

    def test_reads_at_eof(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        reader.seek(-10, io.SEEK_END)
        assert reader.read(100) == plaintext[-10:]
        assert reader.tell() == len(plaintext)
        assert reader.read(1) == b""
        reader.seek(len(plaintext) + 1000)
        assert reader.read(1) == b""

    def test_seek_whence(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        reader.seek(100)
        assert reader.seek(50, io.SEEK_CUR) == 150
        assert reader.read(4) == plaintext[150:154]
        assert reader.seek(0, io.SEEK_END) == len(plaintext)
        with pytest.raises(ValueError, match="negative"):
            reader.seek(-1)
        with pytest.raises(ValueError, match="whence"):
            reader.seek(0, 7)

    def test_readinto(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        reader.seek(self.CHUNK - 10)
        buffer = bytearray(self.CHUNK * 2)
        assert reader.readinto(buffer) == len(buffer)
        assert bytes(buffer) == plaintext[self.CHUNK - 10 : 3 * self.CHUNK - 10]
        reader.seek(len(plaintext) - 5)
        assert reader.readinto(buffer) == 5
        assert bytes(buffer[:5]) == plaintext[-5:]

    def test_buffered_wrapper(self, reader: EnvelopeReader, plaintext: bytes) -> None:
        buffered = io.BufferedReader(reader, buffer_size=300)
        buffered.seek(5000)
        assert buffered.read(2000) == plaintext[5000:7000]
        buffered.seek(0)
        assert buffered.read() == plaintext

    def test_decrypts_only_needed_chunks(self, plaintext: bytes) -> None:
        source = CountingReader(encrypt(plaintext, chunk_size=self.CHUNK))
        reader = EnvelopeReader(KEY, source, associated_data=DOC_ID)
        opened = source.bytes_read  # header + final chunk
        reader.seek(3 * self.CHUNK + 10)
        assert reader.read(20) == plaintext[3 * self.CHUNK + 10 : 3 * self.CHUNK + 30]
        assert source.bytes_read - opened == self.CHUNK + TAG_SIZE
        # Further reads within the same chunk come from the cache.
        reader.seek(3 * self.CHUNK + 500)
        reader.read(20)
        assert source.bytes_read - opened == self.CHUNK + TAG_SIZE

    def test_envelope_at_an_offset(self, plaintext: bytes) -> None:
        source = io.BytesIO(b"prefix-bytes" + encrypt(plaintext, chunk_size=self.CHUNK))
        source.seek(len(b"prefix-bytes"))
        reader = EnvelopeReader(KEY, source, associated_data=DOC_ID)
        assert reader.size == len(plaintext)
        reader.seek(2000)
        assert reader.read(3000) == plaintext[2000:5000]

    def test_on_a_real_file(self, tmp_path: Path, plaintext: bytes) -> None:
        path = tmp_path / "doc.env"
        with open(path, "wb") as sink:
            writer = EnvelopeWriter(KEY, sink, associated_data=DOC_ID, chunk_size=self.CHUNK)
            writer.write(plaintext)
            writer.close()
        with open(path, "rb") as source, EnvelopeReader(KEY, source, associated_data=DOC_ID) as r:
            r.seek(4321)
            assert r.read(1234) == plaintext[4321:5555]

    def test_empty(self) -> None:
        reader = EnvelopeReader(KEY, io.BytesIO(encrypt(b"")), associated_data=DOC_ID)
        assert reader.size == 0
        assert reader.read() == b""

    def test_empty_tampered_is_caught_on_open(self) -> None:
        ciphertext = flip(encrypt(b""), HEADER_SIZE + 3)
        with pytest.raises(EnvelopeError, match="chunk 0 failed authentication"):
            EnvelopeReader(KEY, io.BytesIO(ciphertext), associated_data=DOC_ID)

    def test_tampering_detected_on_read(self, plaintext: bytes) -> None:
        ciphertext = encrypt(plaintext, chunk_size=self.CHUNK)
        start, _ = chunk_bounds(ciphertext, self.CHUNK)[3]
        reader = EnvelopeReader(
            KEY, io.BytesIO(flip(ciphertext, start + 100)), associated_data=DOC_ID
        )
        assert reader.read(self.CHUNK) == plaintext[: self.CHUNK]  # chunk 0 is intact
        reader.seek(3 * self.CHUNK + 5)
        with pytest.raises(EnvelopeError, match="chunk 3 failed authentication"):
            reader.read(1)
        reader.seek(2 * self.CHUNK)
        with pytest.raises(EnvelopeError, match="chunk 3 failed authentication"):
            reader.read(self.CHUNK + 1)  # spans into the bad chunk

    def test_wrong_key_or_associated_data_fails_on_open(self, plaintext: bytes) -> None:
        ciphertext = encrypt(plaintext, chunk_size=self.CHUNK)
        with pytest.raises(EnvelopeError, match="chunk 7 failed authentication"):
            EnvelopeReader(OTHER_KEY, io.BytesIO(ciphertext), associated_data=DOC_ID)
        with pytest.raises(EnvelopeError, match="chunk 7 failed authentication"):
            EnvelopeReader(KEY, io.BytesIO(ciphertext), associated_data=b"other")

    def test_truncated_at_chunk_boundary(self, plaintext: bytes) -> None:
        ciphertext = encrypt(plaintext, chunk_size=self.CHUNK)
        _, end = chunk_bounds(ciphertext, self.CHUNK)[4]
        with pytest.raises(EnvelopeError, match="truncated: final chunk missing"):
            EnvelopeReader(KEY, io.BytesIO(ciphertext[:end]), associated_data=DOC_ID)

    def test_truncated_to_an_impossible_size(self, plaintext: bytes) -> None:
        ciphertext = encrypt(plaintext, chunk_size=self.CHUNK)
        _, end = chunk_bounds(ciphertext, self.CHUNK)[4]
        with pytest.raises(EnvelopeError, match="impossible envelope size"):
            EnvelopeReader(KEY, io.BytesIO(ciphertext[: end + 3]), associated_data=DOC_ID)

    def test_appended_bytes(self, plaintext: bytes) -> None:
        ciphertext = encrypt(plaintext, chunk_size=self.CHUNK)
        with pytest.raises(EnvelopeError):
            EnvelopeReader(KEY, io.BytesIO(ciphertext + b"x" * 40), associated_data=DOC_ID)

    def test_closed(self, reader: EnvelopeReader) -> None:
        reader.close()
        with pytest.raises(ValueError, match="closed"):
            reader.read(1)

    def test_needs_seekable_source(self) -> None:
        class Pipe(io.RawIOBase):
            def readable(self) -> bool:
                return True

        with pytest.raises(ValueError, match="seekable"):
            EnvelopeReader(KEY, Pipe())  # type: ignore[arg-type]


class DiscardingSink(io.RawIOBase):
    """Counts and hashes what it is given without keeping it."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def blocks(count: int, size: int) -> Iterable[bytes]:
    base = pattern(size)
    for i in range(count):
        yield base[i % size :] + base[: i % size]


class TestMemory:
    TOTAL = 32 * 1024 * 1024
    WRITE = 64 * 1024
    LIMIT = 2 * 1024 * 1024

    def test_writer_memory_is_flat(self) -> None:
        pieces = [pattern(self.WRITE), pattern(self.WRITE)[::-1]]
        sink = DiscardingSink()
        tracemalloc.start()
        try:
            writer = EnvelopeWriter(KEY, sink, associated_data=DOC_ID)  # type: ignore[arg-type]
            for i in range(self.TOTAL // self.WRITE):
                writer.write(pieces[i % 2])
            writer.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert writer.plaintext_size == self.TOTAL
        assert sink.size == ciphertext_size(self.TOTAL)
        assert peak < self.LIMIT, f"peak {peak} bytes while encrypting {self.TOTAL}"

    def test_unaligned_writes_memory_is_flat(self) -> None:
        piece = pattern(100_003)
        sink = DiscardingSink()
        tracemalloc.start()
        try:
            writer = EnvelopeWriter(KEY, sink)  # type: ignore[arg-type]
            for _ in range(self.TOTAL // len(piece)):
                writer.write(piece)
            writer.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < self.LIMIT

    def test_stream_decrypt_memory_is_flat(self, tmp_path: Path) -> None:
        path = tmp_path / "big.env"
        digest = hashlib.sha256()
        with open(path, "wb") as sink:
            writer = EnvelopeWriter(KEY, sink, associated_data=DOC_ID)
            for block in blocks(self.TOTAL // self.WRITE, self.WRITE):
                writer.write(block)
            writer.close()
        with open(path, "rb", buffering=0) as source:
            tracemalloc.start()
            try:
                for chunk in decrypt_stream(KEY, source, associated_data=DOC_ID):
                    digest.update(chunk)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert digest.hexdigest() == writer.sha256_hex()
        assert peak < self.LIMIT


def test_a_writer_told_not_to_hash_still_encrypts_and_refuses_a_digest() -> None:
    key = os.urandom(32)
    sink = io.BytesIO()
    data = os.urandom(200_000)
    with EnvelopeWriter(key, sink, associated_data=b"doc", hash_plaintext=False) as writer:
        writer.write(data)
    assert writer.plaintext_size == len(data)
    with pytest.raises(ValueError, match="told not to hash"):
        writer.sha256_hex()
    sink.seek(0)
    assert b"".join(decrypt_stream(key, sink, associated_data=b"doc")) == data


def test_a_writer_refuses_a_digest_it_was_told_not_to_feed() -> None:
    with pytest.raises(ValueError, match="told not to hash"):
        EnvelopeWriter(os.urandom(32), io.BytesIO(), digest=hashlib.sha256(),
                       hash_plaintext=False)
