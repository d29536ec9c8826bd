"""Identity, signed links, file names and sealed fields: the small pieces of the HTTP layer."""

from __future__ import annotations

import os

import pytest

from shared.errors import ApiError
from shared.filenames import clean_filename
from shared.identity import identity_from_headers
from shared.links import KeyringFile, LinkKey, LinkSigner, load_keyring, rotate_keyring
from shared.sealed import SealError, seal, unseal


def test_identity_comes_from_kong_headers() -> None:
    ident = identity_from_headers({"X-Consumer-Username": "d1", "X-Consumer-Groups": "drivers"})
    assert (ident.user_id, ident.role) == ("d1", "driver")
    both = identity_from_headers({"X-Consumer-Username": "a1",
                                  "X-Consumer-Groups": "drivers, agents"})
    assert both.is_agent
    for headers, status in [({}, 401), ({"X-Consumer-Username": "d1"}, 401),
                            ({"X-Consumer-Username": "x\x00", "X-Consumer-Groups": "drivers"},
                             401),
                            ({"X-Consumer-Username": "d1", "X-Consumer-Groups": "vendors"}, 403)]:
        with pytest.raises(ApiError) as info:
            identity_from_headers(headers)
        assert info.value.status == status


def test_links_verify_and_refuse_forgery_and_expiry() -> None:
    signer = LinkSigner([LinkKey(b"s" * 32)], "https://api.test/")
    link = signer.sign("a" * 32, ttl=60, now=1000)
    assert link.url.startswith("https://api.test/v1/files/" + "a" * 32 + "?exp=1060&")
    query = dict(p.split("=", 1) for p in link.url.split("?", 1)[1].split("&"))
    path = "/v1/files/" + "a" * 32
    signer.verify("GET", path, query["exp"], query["sig"], now=1000)
    cases = [
        ("GET", path, "1061", query["sig"], "invalid_link"),       # expiry stretched
        ("GET", "/v1/files/" + "b" * 32, query["exp"], query["sig"], "invalid_link"),
        ("DELETE", path, query["exp"], query["sig"], "invalid_link"),
        ("GET", path, None, None, "invalid_link"),
    ]
    for method, p, exp, sig, code in cases:
        with pytest.raises(ApiError) as info:
            signer.verify(method, p, exp, sig, now=1000)
        assert info.value.code == code
    with pytest.raises(ApiError) as info:
        signer.verify("GET", path, query["exp"], query["sig"], now=1061)
    assert (info.value.status, info.value.code) == (403, "link_expired")
    other = LinkSigner([LinkKey(b"t" * 32)], "https://api.test")
    with pytest.raises(ApiError):
        other.verify("GET", path, query["exp"], query["sig"], now=1000)


def _query(url: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))


def test_malformed_links_are_refused_as_invalid_not_as_errors() -> None:
    signer = LinkSigner([LinkKey(b"s" * 32)], "https://api.test/")
    query = _query(signer.sign("a" * 32, ttl=60, now=1000).url)
    path = "/v1/files/" + "a" * 32
    exp, sig = query["exp"], query["sig"]
    for bad_exp, bad_sig in [
        ("\u00b2", sig),                    # a digit to str.isdigit, not to int
        ("9" * 5000, sig),                  # past int()'s limit on digits
        ("\u0661\u0660\u0666\u0660", sig),  # 1060 in Arabic-Indic digits
        ("0" + exp, sig),                   # the same expiry spelled another way
        ("-1", sig), (" " + exp, sig), (exp + "\n", sig),
        (exp, "\u00e9" * 43),                # not ASCII: hmac.compare_digest raises
        (exp, sig + "="), (exp, sig[:-1]), (exp, sig[:-1] + "+"),
    ]:
        with pytest.raises(ApiError) as info:
            signer.verify("GET", path, bad_exp, bad_sig, now=1000)
        assert (info.value.status, info.value.code) == (403, "invalid_link"), (bad_exp, bad_sig)
    signer.verify("GET", path, exp, sig, now=1000)


def test_two_equal_link_keys_are_refused() -> None:
    # The second would lend its retirement time to the first, the active one.
    with pytest.raises(ValueError, match="must differ"):
        LinkSigner([LinkKey(b"s" * 32), LinkKey(b"s" * 32, accept_until=0.0)], "https://a.test")


def test_a_link_is_current_only_with_the_active_key_and_the_public_url() -> None:
    signer = LinkSigner([LinkKey(b"s" * 32)], "https://api.test/")
    url = signer.sign("a" * 32, ttl=60).url
    assert signer.is_current(url)
    rotated = LinkSigner([LinkKey(b"t" * 32), LinkKey(b"s" * 32, accept_until=2e9)],
                         "https://api.test")
    assert not rotated.is_current(url)
    assert not LinkSigner([LinkKey(b"s" * 32)], "https://new.test").is_current(url)


def test_a_running_signer_follows_a_rotation_of_the_keyring_file(
    tmp_path: os.PathLike[str],
) -> None:
    from pathlib import Path

    keys = Path(tmp_path) / "keys"
    signer = LinkSigner(KeyringFile(keys), "https://api.test")
    path = "/v1/files/" + "a" * 32
    old = _query(signer.sign("a" * 32, ttl=3600, now=1000).url)
    # `docproc keys rotate-link`, in another process: this signer is not rebuilt
    new_key = rotate_keyring(keys, grace_seconds=600, now=1000)
    fresh = _query(signer.sign("a" * 32, ttl=3600, now=1000).url)
    assert fresh["kid"] == new_key.kid != old["kid"]
    signer.verify("GET", path, fresh["exp"], fresh["sig"], fresh["kid"], now=1500)
    signer.verify("GET", path, old["exp"], old["sig"], old["kid"], now=1500)  # in the grace
    with pytest.raises(ApiError) as info:
        signer.verify("GET", path, old["exp"], old["sig"], old["kid"], now=1700)
    assert info.value.code == "link_key_retired"


def test_a_link_lives_at_least_the_time_asked_for() -> None:
    signer = LinkSigner([LinkKey(b"s" * 32)], "https://api.test/")
    link = signer.sign("a" * 32, ttl=1, now=1000.9)
    query = dict(p.split("=", 1) for p in link.url.split("?", 1)[1].split("&"))
    signer.verify("GET", "/v1/files/" + "a" * 32, query["exp"], query["sig"], now=1001.8)
    assert link.expires == 1002


def test_link_keyring_is_generated_once_private_and_rotates_with_grace(
    tmp_path: os.PathLike[str],
) -> None:
    from pathlib import Path

    keys = Path(tmp_path) / "keys"
    first = load_keyring(keys)
    assert len(first) == 1
    assert len(first[0].secret) >= 32
    assert load_keyring(keys) == first
    assert (keys / "link-keys.json").stat().st_mode & 0o777 == 0o600

    old = LinkSigner(first, "https://api.test")
    link = old.sign("a" * 32, ttl=3600, now=1000)
    query = dict(p.split("=", 1) for p in link.url.split("?", 1)[1].split("&"))
    path = "/v1/files/" + "a" * 32

    rotate_keyring(keys, grace_seconds=600, now=1000)
    rotated = load_keyring(keys)
    assert rotated[0] != first[0]
    assert rotated[1].secret == first[0].secret
    new = LinkSigner(rotated, "https://api.test")
    assert new.kid != old.kid
    # within the grace period the old key's links still work...
    new.verify("GET", path, query["exp"], query["sig"], query["kid"], now=1500)
    # ...past it they are refused, although the link itself has not expired
    with pytest.raises(ApiError) as info:
        new.verify("GET", path, query["exp"], query["sig"], query["kid"], now=1700)
    assert (info.value.status, info.value.code) == (403, "link_key_retired")
    fresh = new.sign("a" * 32, ttl=3600, now=1700)
    fq = dict(p.split("=", 1) for p in fresh.url.split("?", 1)[1].split("&"))
    new.verify("GET", path, fq["exp"], fq["sig"], fq["kid"], now=1700)
    # a second rotation past the grace drops the retired key altogether
    rotate_keyring(keys, grace_seconds=600, now=5000)
    assert len(load_keyring(keys)) == 2


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (None, "document"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\scan.pdf", "scan.pdf"),
        ("%2e%2e%2fsecret.pdf", "secret.pdf"),
        ("evil\u202egpj.exe", "evilgpj.exe"),
        ("bell\x07\x00.pdf", "bell.pdf"),
        ("..", "document"),
        (".hidden.pdf", "hidden.pdf"),
        ("Lieferschein Müller.pdf", "Lieferschein Müller.pdf"),
        # separators in disguise: Windows' "best fit" maps the fullwidth solidus to /
        ("..\uff0f..\uff0fetc\uff0fpasswd", "passwd"),
        ("a\u2215b\u2044c.pdf", "c.pdf"),
        ("line\u2028break\u2029.pdf", "linebreak.pdf"),  # no line breaks in a shown name
        ("a:b|c?.pdf", "a_b_c_.pdf"),  # what Windows refuses in a name
        ("CON", "_CON"), ("nul.pdf", "_nul.pdf"), ("Com1 .txt", "_Com1 .txt"),
        ("scan.pdf. . ", "scan.pdf"),  # Windows drops trailing dots and spaces
        (" .pdf", "document.pdf"), ("\u061c.pdf", "document.pdf"),  # an extension alone
    ],
)
def test_file_names_are_cleaned(raw: str | None, clean: str) -> None:
    assert clean_filename(raw) == clean


def test_long_file_names_keep_their_extension_within_255_bytes() -> None:
    name = clean_filename("é" * 5000 + ".pdf")
    assert name.endswith(".pdf")
    assert len(name.encode()) <= 255
    name.encode().decode()  # still valid UTF-8 after the cut


def test_sealed_values_are_bound_to_key_and_context() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"https://link", b"doc-1")
    assert b"https://link" not in sealed
    assert unseal(key, sealed, b"doc-1") == b"https://link"
    with pytest.raises(SealError):
        unseal(key, sealed, b"doc-2")
    with pytest.raises(SealError):
        unseal(os.urandom(32), sealed, b"doc-1")
