from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import DEFAULT_ALLOWED_TYPES, ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("DOCPROC_", "AMQP_", "MONGODB_", "REDIS_", "KMS_", "FIREBASE_",
                            "FCM_", "EFS_", "K_SINK", "PORT")):
            monkeypatch.delenv(name)


def test_defaults_are_the_embedded_installation() -> None:
    s = load_settings()
    assert (s.amqp_url, s.mongodb_uri, s.redis_url, s.kms_key_id) == (None, None, None, None)
    assert s.data_dir == Path(".docproc")
    assert s.efs_root == Path(".docproc/efs")
    assert s.outbox_path == Path(".docproc/outbox/notifications.jsonl")
    assert s.max_upload_bytes == 50 * 1024 * 1024
    assert s.allowed_types == DEFAULT_ALLOWED_TYPES
    assert s.public_url == "http://127.0.0.1:8080"


def test_environment_selects_real_services(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    creds = tmp_path / "sa.json"
    creds.write_text("{}")
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@mq:5672/%2F")
    monkeypatch.setenv("MONGODB_URI", "mongodb://db:27017/")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("EFS_ROOT", "/mnt/efs")
    monkeypatch.setenv("FIREBASE_CREDENTIALS", str(creds))
    monkeypatch.setenv("DOCPROC_ALLOWED_TYPES", "application/pdf, IMAGE/PNG")
    monkeypatch.setenv("DOCPROC_PUBLIC_URL", "https://api.example.test/")
    monkeypatch.setenv("PORT", "9000")
    s = load_settings()
    assert s.amqp_url == "amqp://u:p@mq:5672/%2F"
    assert s.efs_root == Path("/mnt/efs")
    assert s.allowed_types == ("application/pdf", "image/png")
    assert s.public_url == "https://api.example.test"
    assert s.port == 9000


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("DOCPROC_MAX_UPLOAD_BYTES", "lots", "DOCPROC_MAX_UPLOAD_BYTES"),
        ("DOCPROC_MAX_UPLOAD_BYTES", "0", "greater than 0"),
        ("AMQP_URL", "http://mq", "amqp://"),
        ("MONGODB_URI", "db:27017", "mongodb://"),
        ("REDIS_URL", "cache:6379", "redis://"),
        ("DOCPROC_ALLOWED_TYPES", "pdf", "not a media type"),
        ("FIREBASE_CREDENTIALS", "/nonexistent/sa.json", "no such file"),
        ("DOCPROC_RETRY_DELAYS", "1,soon", "DOCPROC_RETRY_DELAYS"),
        ("DOCPROC_RETRY_DELAYS", ",", "at least one delay"),
        ("DOCPROC_RETRY_DELAYS", "1,-5", "0 to 86400 seconds"),
        ("DOCPROC_RETRY_DELAYS", "1,inf", "DOCPROC_RETRY_DELAYS"),
        ("DOCPROC_RETRY_DELAYS", "nan", "DOCPROC_RETRY_DELAYS"),
        ("DOCPROC_RELAY_INTERVAL_SECONDS", "inf", "finite number"),
        ("DOCPROC_OUTBOX_GRACE_SECONDS", "inf", "finite number"),
        ("DOCPROC_EVENT_SOURCE", "", "DOCPROC_EVENT_SOURCE"),
        ("DOCPROC_EVENT_SOURCE", "/doc proc", "DOCPROC_EVENT_SOURCE"),
        # Links and endpoint paths are appended to these: each must be a plain base URL.
        ("FCM_ENDPOINT", "https://", "with a host"),
        ("FCM_ENDPOINT", "https://fcm.test:0", "with a host"),
        ("FCM_ENDPOINT", "https://fcm.test:http", "with a host"),
        ("K_SINK", "http://[::1", "with a host"),
        ("DOCPROC_PUBLIC_URL", "https://docs.test?q=1", "no query"),
        ("DOCPROC_PUBLIC_URL", "https://docs.test/#top", "no query"),
        ("DOCPROC_PUBLIC_URL", "ftp://docs.test", "http:// or https://"),
        ("DOCPROC_PUBLIC_URL", "https://docs.te\tst", "with a host"),
        ("FCM_ENDPOINT", " https://fcm.test", "with a host"),
        ("DOCPROC_PORT", "70000", "DOCPROC_PORT"),
        # A mark waiting longer than half the grace would be raced by the relay.
        ("DOCPROC_OUTBOX_GRACE_SECONDS", "3", "DOCPROC_OUTBOX_MARK_LINGER_SECONDS (2) must be "
                                              "at most half of DOCPROC_OUTBOX_GRACE_SECONDS (3)"),
    ],
)
def test_bad_values_fail_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, complaint: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert variable in str(info.value)
    assert complaint in str(info.value)


def test_a_previous_link_key_equal_to_the_current_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It would carry the previous key's retirement time to every link, new ones included.
    monkeypatch.setenv("DOCPROC_LINK_KEY", "k" * 32)
    monkeypatch.setenv("DOCPROC_LINK_PREVIOUS_KEY", "k" * 32)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "DOCPROC_LINK_PREVIOUS_KEY must differ from DOCPROC_LINK_KEY" in str(info.value)
    monkeypatch.setenv("DOCPROC_LINK_PREVIOUS_KEY", "p" * 32)
    assert load_settings().link_previous_key == "p" * 32


def test_blank_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "")
    monkeypatch.setenv("FIREBASE_CREDENTIALS", " ")
    s = load_settings()
    assert s.amqp_url is None
    assert s.firebase_credentials is None


def test_docproc_serve_reports_a_bad_value_and_exits(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from docproc.cli import main

    monkeypatch.setenv("DOCPROC_MAX_UPLOAD_BYTES", "-5")
    assert main(["serve"]) == 2
    assert "DOCPROC_MAX_UPLOAD_BYTES" in capsys.readouterr().err
