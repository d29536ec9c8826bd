"""Tests for the key-encryption-key providers (shared.keys)."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from shared.keys import (
    KeyProvider,
    KeyProviderError,
    KmsKeyProvider,
    LocalKeyring,
    WrappedKey,
    canonical_context,
)

CONTEXT = {"document_id": "doc-abc"}
OTHER_CONTEXT = {"document_id": "doc-xyz"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("local-*.key"))


@pytest.fixture
def keyring_dir(tmp_path: Path) -> Path:
    return tmp_path / "keyring"


@pytest.fixture
def keyring(keyring_dir: Path) -> LocalKeyring:
    return LocalKeyring(keyring_dir)


class TestWrappedKey:
    def test_doc_round_trip(self) -> None:
        wrapped = WrappedKey(provider="kms", key_id="arn:aws:kms:x", blob=b"\x00\x01blob")
        doc = wrapped.to_doc()
        assert doc == {"provider": "kms", "key_id": "arn:aws:kms:x", "blob": b"\x00\x01blob"}
        assert isinstance(doc["blob"], bytes)
        assert WrappedKey.from_doc(doc) == wrapped

    def test_from_doc_accepts_bytes_subclasses_and_buffers(self) -> None:
        class Binary(bytes):  # what pymongo hands back for BinData
            pass

        for blob in (Binary(b"abc"), bytearray(b"abc"), memoryview(b"abc")):
            doc = {"provider": "local", "key_id": "local-0123456789abcdef", "blob": blob}
            restored = WrappedKey.from_doc(doc)
            assert restored.blob == b"abc"
            assert type(restored.blob) is bytes

    @pytest.mark.parametrize(
        ("doc", "message"),
        [
            ({"key_id": "k", "blob": b"x"}, "lacks field 'provider'"),
            ({"provider": "local", "blob": b"x"}, "lacks field 'key_id'"),
            ({"provider": "local", "key_id": "k"}, "lacks field 'blob'"),
            ({"provider": "vault", "key_id": "k", "blob": b"x"}, "unknown key provider"),
            ({"provider": "local", "key_id": "", "blob": b"x"}, "key_id"),
            ({"provider": "local", "key_id": "k", "blob": "not-bytes"}, "binary"),
        ],
    )
    def test_from_doc_rejects_bad_documents(self, doc: dict[str, Any], message: str) -> None:
        with pytest.raises(KeyProviderError, match=message):
            WrappedKey.from_doc(doc)

    def test_is_immutable(self) -> None:
        wrapped = WrappedKey(provider="local", key_id="k", blob=b"x")
        with pytest.raises(AttributeError):
            wrapped.key_id = "other"  # type: ignore[misc]


class TestCanonicalContext:
    def test_sorted_and_compact(self) -> None:
        assert canonical_context({"b": "2", "a": "1"}) == b'{"a":"1","b":"2"}'
        assert canonical_context({"a": "1", "b": "2"}) == canonical_context({"b": "2", "a": "1"})

    def test_rejects_non_strings(self) -> None:
        with pytest.raises(KeyProviderError, match="strings"):
            canonical_context({"document_id": 5})  # type: ignore[dict-item]


class TestLocalKeyring:
    def test_is_a_key_provider(self, keyring: LocalKeyring) -> None:
        provider: KeyProvider = keyring
        assert isinstance(provider, KeyProvider)
        assert provider.name == "local"

    def test_round_trip(self, keyring: LocalKeyring) -> None:
        data_key, wrapped = keyring.generate(CONTEXT)
        assert len(data_key) == 32
        assert wrapped.provider == "local"
        assert wrapped.key_id == keyring.active_key_id()
        assert wrapped.key_id.startswith("local-")
        assert len(wrapped.blob) == 12 + 32 + 16
        assert data_key not in wrapped.blob
        assert keyring.unwrap(wrapped, CONTEXT) == data_key

    def test_context_key_order_does_not_matter(self, keyring: LocalKeyring) -> None:
        data_key, wrapped = keyring.generate({"a": "1", "document_id": "d"})
        assert keyring.unwrap(wrapped, {"document_id": "d", "a": "1"}) == data_key

    def test_data_keys_and_blobs_are_fresh(self, keyring: LocalKeyring) -> None:
        first, second = keyring.generate(CONTEXT), keyring.generate(CONTEXT)
        assert first[0] != second[0]
        assert first[1].blob[:12] != second[1].blob[:12]

    def test_round_trip_through_document_form(self, keyring: LocalKeyring) -> None:
        data_key, wrapped = keyring.generate(CONTEXT)
        assert keyring.unwrap(WrappedKey.from_doc(wrapped.to_doc()), CONTEXT) == data_key

    def test_permissions(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        keyring.rotate()
        assert mode(keyring_dir) == 0o700
        files = key_files(keyring_dir)
        assert len(files) == 2
        for path in [*files, keyring_dir / "active", keyring_dir / ".lock"]:
            assert mode(path) == 0o600, path
        for path in files:
            assert len(path.read_bytes()) == 32

    def test_permissions_despite_permissive_umask(self, tmp_path: Path) -> None:
        old = os.umask(0)
        try:
            LocalKeyring(tmp_path / "open-umask")
        finally:
            os.umask(old)
        assert mode(tmp_path / "open-umask") == 0o700
        for path in key_files(tmp_path / "open-umask"):
            assert mode(path) == 0o600

    def test_no_temp_files_left(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        keyring.rotate()
        assert not list(keyring_dir.glob("*.tmp"))

    def test_layout(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        active = keyring.active_key_id()
        assert (keyring_dir / "active").read_text() == f"{active}\n"
        assert key_files(keyring_dir) == [keyring_dir / f"{active}.key"]

    def test_wrong_context_fails(self, keyring: LocalKeyring) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        with pytest.raises(KeyProviderError, match="wrong context or tampered"):
            keyring.unwrap(wrapped, OTHER_CONTEXT)
        with pytest.raises(KeyProviderError, match="wrong context or tampered"):
            keyring.unwrap(wrapped, {})
        with pytest.raises(KeyProviderError, match="wrong context or tampered"):
            keyring.unwrap(wrapped, {**CONTEXT, "extra": "x"})

    @pytest.mark.parametrize("offset", [0, 11, 12, 30, 59])
    def test_tampered_blob_fails(self, keyring: LocalKeyring, offset: int) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        blob = bytearray(wrapped.blob)
        blob[offset] ^= 0x80
        tampered = WrappedKey(provider="local", key_id=wrapped.key_id, blob=bytes(blob))
        with pytest.raises(KeyProviderError, match="unwrap failed"):
            keyring.unwrap(tampered, CONTEXT)

    def test_truncated_blob_fails(self, keyring: LocalKeyring) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        short = WrappedKey(provider="local", key_id=wrapped.key_id, blob=wrapped.blob[:-1])
        with pytest.raises(KeyProviderError, match="unwrap failed"):
            keyring.unwrap(short, CONTEXT)

    def test_unknown_key_id(self, keyring: LocalKeyring) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        unknown = WrappedKey(provider="local", key_id="local-0000000000000000", blob=wrapped.blob)
        with pytest.raises(KeyProviderError, match="unknown key id"):
            keyring.unwrap(unknown, CONTEXT)

    @pytest.mark.parametrize("key_id", ["../../etc/passwd", "local-../../x", "/abs", "LOCAL-X"])
    def test_key_id_cannot_escape_directory(self, keyring: LocalKeyring, key_id: str) -> None:
        wrapped = WrappedKey(provider="local", key_id=key_id, blob=bytes(60))
        with pytest.raises(KeyProviderError, match="invalid local key id"):
            keyring.unwrap(wrapped, CONTEXT)

    def test_other_provider_rejected(self, keyring: LocalKeyring) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        foreign = WrappedKey(provider="kms", key_id=wrapped.key_id, blob=wrapped.blob)
        with pytest.raises(KeyProviderError, match="provider 'kms'"):
            keyring.unwrap(foreign, CONTEXT)

    def test_corrupt_key_file_detected(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        (keyring_dir / f"{wrapped.key_id}.key").write_bytes(bytes(32))
        with pytest.raises(KeyProviderError, match="corrupt"):
            LocalKeyring(keyring_dir).unwrap(wrapped, CONTEXT)

    def test_rotate(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        old_id = keyring.active_key_id()
        old_key, old_wrapped = keyring.generate(CONTEXT)

        new_id = keyring.rotate()

        assert new_id != old_id
        assert keyring.active_key_id() == new_id
        assert len(key_files(keyring_dir)) == 2
        # Old wrapped keys still unwrap, and new ones use the new KEK.
        assert keyring.unwrap(old_wrapped, CONTEXT) == old_key
        _, fresh = keyring.generate(CONTEXT)
        assert fresh.key_id == new_id

        rewrapped = keyring.rewrap(old_wrapped, CONTEXT)
        assert rewrapped.key_id == new_id
        assert rewrapped.blob != old_wrapped.blob
        assert keyring.unwrap(rewrapped, CONTEXT) == old_key
        # Still bound to its document after moving.
        with pytest.raises(KeyProviderError):
            keyring.unwrap(rewrapped, OTHER_CONTEXT)

    def test_rewrap_under_active_key_returns_same_object(self, keyring: LocalKeyring) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        assert keyring.rewrap(wrapped, CONTEXT) is wrapped

    def test_rewrap_with_wrong_context_fails(self, keyring: LocalKeyring) -> None:
        _, wrapped = keyring.generate(CONTEXT)
        keyring.rotate()
        with pytest.raises(KeyProviderError, match="wrong context"):
            keyring.rewrap(wrapped, OTHER_CONTEXT)

    def test_rewrap_across_several_rotations(self, keyring: LocalKeyring) -> None:
        data_key, wrapped = keyring.generate(CONTEXT)
        for _ in range(3):
            keyring.rotate()
        rewrapped = keyring.rewrap(wrapped, CONTEXT)
        assert rewrapped.key_id == keyring.active_key_id()
        assert keyring.unwrap(rewrapped, CONTEXT) == data_key

    def test_reopen_gives_same_active_key(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        data_key, wrapped = keyring.generate(CONTEXT)
        reopened = LocalKeyring(keyring_dir)
        assert reopened.active_key_id() == keyring.active_key_id()
        assert reopened.unwrap(wrapped, CONTEXT) == data_key
        assert len(key_files(keyring_dir)) == 1

    def test_reopen_after_rotate(self, keyring: LocalKeyring, keyring_dir: Path) -> None:
        rotated = keyring.rotate()
        assert LocalKeyring(keyring_dir).active_key_id() == rotated

    def test_rotation_seen_by_other_instance(
        self, keyring: LocalKeyring, keyring_dir: Path
    ) -> None:
        other = LocalKeyring(keyring_dir)
        data_key, wrapped = keyring.generate(CONTEXT)
        rotated = other.rotate()
        assert keyring.active_key_id() == rotated
        _, fresh = keyring.generate(CONTEXT)
        assert other.unwrap(fresh, CONTEXT) is not None
        assert other.unwrap(wrapped, CONTEXT) == data_key

    def test_an_unchanged_settled_pointer_is_not_read_again(
        self, keyring: LocalKeyring, keyring_dir: Path
    ) -> None:
        pointer = keyring_dir / "active"
        _settle(pointer)
        first = keyring.active_key_id()
        # Other bytes with the file's inode, mtime and size as they were: only reading the
        # file again could tell.
        _rewrite_keeping_stamp(pointer, b"local-" + b"0" * 16 + b"\n")
        assert keyring.active_key_id() == first

    def test_a_settled_pointer_rotated_or_edited_in_place_is_read_again(
        self, keyring: LocalKeyring, keyring_dir: Path
    ) -> None:
        pointer = keyring_dir / "active"
        _settle(pointer)
        first = keyring.active_key_id()
        rotated = LocalKeyring(keyring_dir).rotate()  # a new file renamed over it
        assert keyring.active_key_id() == rotated
        _settle(pointer)
        assert keyring.active_key_id() == rotated
        pointer.write_text(f"{first}\n")  # an operator's edit: same inode, new mtime
        assert keyring.active_key_id() == first
        _, wrapped = keyring.generate(CONTEXT)
        assert wrapped.key_id == first

    def test_a_pointer_written_moments_ago_is_always_read(
        self, keyring: LocalKeyring, keyring_dir: Path
    ) -> None:
        pointer = keyring_dir / "active"
        first = keyring.active_key_id()
        rotated = keyring.rotate()
        assert keyring.active_key_id() == rotated
        # Back to the first pointer's bytes within the same tick of the file system's clock
        # (an inode reused, say), so the stamp is unchanged: for a file this fresh it
        # cannot be trusted.
        _rewrite_keeping_stamp(pointer, f"{first}\n".encode())
        assert keyring.active_key_id() == first != rotated

    def test_existing_directory_is_used(self, tmp_path: Path) -> None:
        directory = tmp_path / "exists"
        directory.mkdir(mode=0o700)
        keyring = LocalKeyring(directory)
        assert len(key_files(directory)) == 1
        assert keyring.active_key_id() == key_files(directory)[0].stem

    def test_path_that_is_a_file(self, tmp_path: Path) -> None:
        path = tmp_path / "file"
        path.write_text("x")
        with pytest.raises(KeyProviderError, match="not a directory"):
            LocalKeyring(path)

    def test_corrupt_active_pointer(self, keyring_dir: Path) -> None:
        LocalKeyring(keyring_dir)
        (keyring_dir / "active").write_text("../../escape\n")
        with pytest.raises(KeyProviderError, match="corrupt active key pointer"):
            LocalKeyring(keyring_dir)

    @pytest.mark.parametrize("attempt", range(10))
    def test_concurrent_open_of_empty_directory(self, tmp_path: Path, attempt: int) -> None:
        directory = tmp_path / f"race-{attempt}"
        directory.mkdir(mode=0o700)
        results, errors = open_concurrently(directory, workers=8)
        assert not errors
        assert len(results) == 8
        assert len(set(results)) == 1
        assert key_files(directory) == [directory / f"{results[0]}.key"]


def _settle(path: Path) -> None:
    """Date a file a minute back, as a pointer written long before it is read would be."""
    past = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(past, past))


def _rewrite_keeping_stamp(path: Path, data: bytes) -> None:
    """New bytes of the same length in place, the mtime put back: a stat sees no change."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def open_concurrently(directory: Path, workers: int) -> tuple[list[str], list[BaseException]]:
    """Open ``workers`` keyrings on one directory at (as near as possible) the same moment."""
    barrier = threading.Barrier(workers)
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def open_keyring() -> None:
        try:
            barrier.wait()
            active = LocalKeyring(directory).active_key_id()
            with lock:
                results.append(active)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=open_keyring) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


REGION = "eu-west-1"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    for name in ("AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kms(aws_env: None) -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("kms", region_name=REGION)


def create_key(kms: Any) -> tuple[str, str]:
    metadata = kms.create_key(Description="docproc test KEK")["KeyMetadata"]
    return metadata["KeyId"], metadata["Arn"]


class TestKms:
    def test_is_a_key_provider(self, kms: Any) -> None:
        key_id, _ = create_key(kms)
        provider: KeyProvider = KmsKeyProvider(key_id, client=kms)
        assert isinstance(provider, KeyProvider)
        assert provider.name == "kms"

    def test_round_trip(self, kms: Any) -> None:
        key_id, arn = create_key(kms)
        provider = KmsKeyProvider(key_id, client=kms)
        data_key, wrapped = provider.generate(CONTEXT)
        assert len(data_key) == 32
        assert wrapped.provider == "kms"
        assert wrapped.key_id == arn
        assert provider.active_key_id() == arn
        assert provider.unwrap(wrapped, CONTEXT) == data_key
        assert provider.unwrap(WrappedKey.from_doc(wrapped.to_doc()), CONTEXT) == data_key

    def test_default_client_from_environment(self, kms: Any) -> None:
        key_id, _ = create_key(kms)
        provider = KmsKeyProvider(key_id)
        data_key, wrapped = provider.generate(CONTEXT)
        assert provider.unwrap(wrapped, CONTEXT) == data_key

    def test_alias(self, kms: Any) -> None:
        key_id, arn = create_key(kms)
        kms.create_alias(AliasName="alias/docproc-test", TargetKeyId=key_id)
        provider = KmsKeyProvider("alias/docproc-test", client=kms)
        data_key, wrapped = provider.generate(CONTEXT)
        assert wrapped.key_id == arn
        assert provider.active_key_id() == arn
        assert provider.rewrap(wrapped, CONTEXT) is wrapped
        assert provider.unwrap(wrapped, CONTEXT) == data_key

    def test_wrong_context_fails(self, kms: Any) -> None:
        key_id, _ = create_key(kms)
        provider = KmsKeyProvider(key_id, client=kms)
        _, wrapped = provider.generate(CONTEXT)
        with pytest.raises(KeyProviderError, match="InvalidCiphertextException"):
            provider.unwrap(wrapped, OTHER_CONTEXT)

    def test_tampered_blob_fails(self, kms: Any) -> None:
        key_id, _ = create_key(kms)
        provider = KmsKeyProvider(key_id, client=kms)
        _, wrapped = provider.generate(CONTEXT)
        blob = bytearray(wrapped.blob)
        blob[-1] ^= 0x01
        tampered = WrappedKey(provider="kms", key_id=wrapped.key_id, blob=bytes(blob))
        with pytest.raises(KeyProviderError, match="KMS Decrypt failed"):
            provider.unwrap(tampered, CONTEXT)

    def test_unknown_key(self, kms: Any) -> None:
        provider = KmsKeyProvider("00000000-0000-0000-0000-000000000000", client=kms)
        with pytest.raises(KeyProviderError, match="KMS GenerateDataKey failed: NotFoundException"):
            provider.generate(CONTEXT)

    def test_local_wrapped_key_rejected(self, kms: Any) -> None:
        key_id, _ = create_key(kms)
        provider = KmsKeyProvider(key_id, client=kms)
        local = WrappedKey(provider="local", key_id="local-0123456789abcdef", blob=bytes(60))
        with pytest.raises(KeyProviderError, match="provider 'local'"):
            provider.unwrap(local, CONTEXT)

    def test_rewrap_to_second_key(self, kms: Any) -> None:
        key1, arn1 = create_key(kms)
        key2, arn2 = create_key(kms)
        first = KmsKeyProvider(key1, client=kms)
        second = KmsKeyProvider(key2, client=kms)
        data_key, wrapped = first.generate(CONTEXT)

        rewrapped = second.rewrap(wrapped, CONTEXT)

        assert wrapped.key_id == arn1
        assert rewrapped.key_id == arn2
        assert rewrapped.blob != wrapped.blob
        assert second.unwrap(rewrapped, CONTEXT) == data_key
        with pytest.raises(KeyProviderError):
            second.unwrap(rewrapped, OTHER_CONTEXT)
        # Decrypt pins the key id, so a blob cannot be passed off as another key's.
        relabelled = WrappedKey(provider="kms", key_id=arn1, blob=rewrapped.blob)
        with pytest.raises(KeyProviderError, match="KMS Decrypt failed"):
            first.unwrap(relabelled, CONTEXT)

    def test_rewrap_under_active_key_returns_same_object(self, kms: Any) -> None:
        key_id, _ = create_key(kms)
        provider = KmsKeyProvider(key_id, client=kms)
        _, wrapped = provider.generate(CONTEXT)
        assert provider.rewrap(wrapped, CONTEXT) is wrapped

    def test_rewrap_with_wrong_context_fails(self, kms: Any) -> None:
        key1, _ = create_key(kms)
        key2, _ = create_key(kms)
        _, wrapped = KmsKeyProvider(key1, client=kms).generate(CONTEXT)
        with pytest.raises(KeyProviderError, match="KMS ReEncrypt failed"):
            KmsKeyProvider(key2, client=kms).rewrap(wrapped, OTHER_CONTEXT)
