"""Push senders against the real firebase-admin client and a loopback FCM stub."""

from __future__ import annotations

import http.server
import json
import multiprocessing
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import firebase_admin
import pytest
from firebase_admin import credentials, messaging

from shared.push import FcmSender, OutboxSender, PushMessage, PushResult, PushSender
from tests.fcm_stub import FcmStub
from tests.helpers import nonblocking

FAST = 3.0  # seconds; anything slower means a client-side retry/backoff sneaked in


@pytest.fixture
def stub() -> Iterator[FcmStub]:
    with FcmStub(project_id="docproc-test") as running:
        yield running


@pytest.fixture
def service_account(stub: FcmStub, tmp_path: Path) -> Path:
    return stub.write_service_account(tmp_path / "secrets" / "service-account.json")


@pytest.fixture
def sender(stub: FcmStub, service_account: Path) -> Iterator[FcmSender]:
    fcm = FcmSender(service_account, endpoint=stub.base_url)
    yield fcm
    fcm.close()


def _msg(token: str, **data: str) -> PushMessage:
    return PushMessage(token=token, title=f"Title {token}", body=f"Body for {token}", data=data)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- FcmSender ----------------------------------------------------------------------------


def test_sends_to_two_tokens_with_bearer_token_from_stub(stub: FcmStub, sender: FcmSender) -> None:
    messages = [_msg("tok-a", doc_id="d1", kind="ready"), _msg("tok-b", doc_id="d2")]

    results = sender.send(messages)

    assert [r.token for r in results] == ["tok-a", "tok-b"]
    assert [r.outcome for r in results] == ["sent", "sent"]
    for result in results:
        assert result.message_id is not None
        assert result.message_id.startswith("projects/docproc-test/messages/")
        assert result.error is None
    assert len({r.message_id for r in results}) == 2

    issued = stub.issued_tokens
    assert issued, "firebase-admin never called the stub's token endpoint"
    claims = stub.token_requests[0]
    assert claims["iss"] == f"firebase-adminsdk-stub@{stub.project_id}.iam.gserviceaccount.com"
    assert "https://www.googleapis.com/auth/cloud-platform" in claims["scope"].split()

    for message in messages:
        received = stub.messages_for(message.token)
        assert len(received) == 1
        got = received[0]
        assert got["notification"] == {"title": message.title, "body": message.body}
        assert got["data"] == dict(message.data)
        assert got["android"]["priority"] == "high"
        assert got["apns"]["payload"]["aps"]["content-available"] == 1
        auth = got["_auth"]
        assert auth.startswith("Bearer stub-token-")
        assert auth.removeprefix("Bearer ") in issued
    assert len(stub.received) == 2


def test_token_is_fetched_once_and_reused(stub: FcmStub, sender: FcmSender) -> None:
    sender.send([_msg("t1")])
    sender.send([_msg("t2"), _msg("t3")])
    assert len(stub.token_requests) == 1
    assert {m["_auth"] for m in stub.received} == {f"Bearer {next(iter(stub.issued_tokens))}"}


def test_unregistered_token_does_not_affect_others(stub: FcmStub, sender: FcmSender) -> None:
    stub.unregister("tok-gone")

    results = sender.send([_msg("tok-gone"), _msg("tok-live")])

    gone, live = results
    assert gone == PushResult(token="tok-gone", outcome="unregistered", error=gone.error)
    assert gone.error is not None
    assert "UnregisteredError" in gone.error
    assert live.outcome == "sent"
    assert stub.messages_for("tok-gone") == []
    assert len(stub.messages_for("tok-live")) == 1


def test_quota_exceeded_with_retry_after_is_returned_without_sleeping(
    stub: FcmStub, sender: FcmSender
) -> None:
    sender.send([_msg("warm-up")])  # token fetch out of the timing
    attempts_before = stub.send_attempts
    stub.fail_next(1, status=429, retry_after=7)

    started = time.monotonic()
    [result] = sender.send([_msg("tok-a")])
    elapsed = time.monotonic() - started

    assert result.outcome == "retry"
    assert result.retry_after == 7
    assert result.message_id is None
    assert result.error is not None
    assert "QuotaExceededError" in result.error
    assert elapsed < FAST
    # firebase-admin's default policy would have slept 7 s and retried up to 4 times
    assert stub.send_attempts - attempts_before == 1
    assert stub.messages_for("tok-a") == []


def test_a_few_503s_are_retried_quickly_by_the_client(stub: FcmStub, sender: FcmSender) -> None:
    sender.send([_msg("warm-up")])
    attempts_before = stub.send_attempts
    stub.fail_next(2, status=503)

    started = time.monotonic()
    [result] = sender.send([_msg("tok-a")])

    assert time.monotonic() - started < FAST
    assert result.outcome == "sent"
    assert stub.send_attempts - attempts_before == 3
    assert len(stub.messages_for("tok-a")) == 1


def test_persistent_503_is_a_fast_retry_outcome(stub: FcmStub, sender: FcmSender) -> None:
    stub.fail_next(10, status=503)

    started = time.monotonic()
    [result] = sender.send([_msg("tok-a")])

    assert time.monotonic() - started < FAST
    assert result.outcome == "retry"
    assert result.retry_after is None
    assert result.error is not None
    assert "UnavailableError" in result.error
    assert stub.send_attempts == 3  # first try + 2 quick client retries


def test_503_with_retry_after_is_handed_back_immediately(stub: FcmStub, sender: FcmSender) -> None:
    stub.fail_next(3, status=503, retry_after=30)

    started = time.monotonic()
    [result] = sender.send([_msg("tok-a")])

    assert time.monotonic() - started < FAST
    assert result.outcome == "retry"
    assert result.retry_after == 30
    assert stub.send_attempts == 1


def test_500_is_retry(stub: FcmStub, sender: FcmSender) -> None:
    stub.fail_next(5, status=500)
    [result] = sender.send([_msg("tok-a")])
    assert result.outcome == "retry"


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "InvalidArgumentError"), (403, "SenderIdMismatchError")],
)
def test_permanent_errors_are_failed(
    stub: FcmStub, sender: FcmSender, status: int, error_type: str
) -> None:
    stub.fail_next(1, status=status)

    results = sender.send([_msg("tok-a"), _msg("tok-b")])

    # send_each posts concurrently, so either message may be the one that meets the failure
    assert sorted(r.outcome for r in results) == ["failed", "sent"]
    [failed] = [r for r in results if r.outcome == "failed"]
    [ok] = [r for r in results if r.outcome == "sent"]
    assert [m["token"] for m in stub.received] == [ok.token]
    assert failed.outcome == "failed"
    assert failed.retry_after is None
    assert failed.error is not None
    assert error_type in failed.error


def test_invalid_message_fails_alone(stub: FcmStub, sender: FcmSender) -> None:
    results = sender.send([_msg(""), _msg("tok-b")])

    assert [r.outcome for r in results] == ["failed", "sent"]
    assert results[0].error is not None
    assert "ValueError" in results[0].error
    assert [m["token"] for m in stub.received] == ["tok-b"]


def test_unreachable_endpoint_is_retry(stub: FcmStub, service_account: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    with FcmSender(service_account, endpoint=dead) as fcm:
        started = time.monotonic()
        [result] = fcm.send([_msg("tok-a")])
    assert time.monotonic() - started < FAST
    assert result.outcome == "retry"
    assert stub.issued_tokens  # the token endpoint was fine; the FCM host was not


def test_token_endpoint_down_is_retry(tmp_path: Path) -> None:
    with FcmStub() as stub:
        path = stub.write_service_account(tmp_path / "sa.json")
        endpoint = stub.base_url
    # stub stopped: neither token endpoint nor FCM answer
    with FcmSender(path, endpoint=endpoint) as fcm:
        results = fcm.send([_msg("tok-a"), _msg("tok-b")])
    assert [r.outcome for r in results] == ["retry", "retry"]


class _DropsThenUnavailable(http.server.BaseHTTPRequestHandler):
    """An FCM host whose first answer is lost (the connection closes unanswered) and which
    then answers 503: a read retry and status retries, counted together."""

    attempts = 0

    def do_POST(self) -> None:
        type(self).attempts += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if type(self).attempts == 1:
            self.close_connection = True
            return
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_request_is_tried_at_most_three_times_whatever_fails(
    stub: FcmStub, service_account: Path,
) -> None:
    """A delivery's lease is sized by the tries one send can make: each kind of error had its
    own count, so a lost answer followed by 503s made four tries where three were allowed
    for."""
    server = nonblocking(http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                         _DropsThenUnavailable))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FcmSender(service_account,
                       endpoint=f"http://127.0.0.1:{server.server_address[1]}") as fcm:
            [result] = fcm.send([_msg("tok-a")])
            worst_one, worst_batches = fcm.worst_case_seconds(1), fcm.worst_case_seconds(230)
    finally:
        server.shutdown()
        server.server_close()
    assert result.outcome == "retry"
    assert _DropsThenUnavailable.attempts == 3
    # Three tries, each connecting and reading up to the client's timeout; 230 messages go
    # out in three sends of up to 100, one after another.
    assert worst_one >= 3 * 2 * 15.0
    assert worst_batches == 3 * worst_one


def test_empty_send(sender: FcmSender) -> None:
    assert sender.send([]) == []


def test_batches_larger_than_one_send_each_call(stub: FcmStub, sender: FcmSender) -> None:
    messages = [_msg(f"tok-{i}", n=str(i)) for i in range(230)]
    results = sender.send(messages)
    assert [r.token for r in results] == [m.token for m in messages]
    assert all(r.outcome == "sent" for r in results)
    assert len(stub.received) == 230


def test_apps_are_dedicated_and_url_override_is_instance_only(
    stub: FcmStub, service_account: Path
) -> None:
    first = FcmSender(service_account, endpoint=stub.base_url)
    second = FcmSender(service_account, endpoint=stub.base_url)
    other_app = firebase_admin.initialize_app(
        credentials.Certificate(str(service_account)), name="unrelated-app"
    )
    try:
        assert first.app_name != second.app_name
        assert firebase_admin.get_app(first.app_name) is not None
        assert messaging._MessagingService.FCM_URL.startswith("https://fcm.googleapis.com/")
        untouched = messaging._get_messaging_service(other_app)
        assert untouched._fcm_url.startswith("https://fcm.googleapis.com/")
    finally:
        firebase_admin.delete_app(other_app)
        second.close()
        first.close()
    with pytest.raises(ValueError, match="does not exist"):
        firebase_admin.get_app(first.app_name)
    first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        first.send([_msg("tok-a")])


def test_explicit_app_name(stub: FcmStub, service_account: Path) -> None:
    with FcmSender(service_account, endpoint=stub.base_url, app_name="push-explicit") as fcm:
        assert fcm.app_name == "push-explicit"
        assert fcm.send([_msg("tok-a")])[0].outcome == "sent"
    with pytest.raises(ValueError, match="does not exist"):
        firebase_admin.get_app("push-explicit")


def test_no_deprecation_warning_per_message(
    sender: FcmSender, recwarn: pytest.WarningsRecorder
) -> None:
    sender.send([_msg("tok-a")])
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_senders_satisfy_protocol(sender: FcmSender, tmp_path: Path) -> None:
    senders: list[PushSender] = [sender, OutboxSender(tmp_path / "outbox.jsonl")]
    for push in senders:
        assert push.send([_msg("tok-p")])[0].outcome == "sent"


# -- OutboxSender -------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def test_outbox_writes_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "outbox.jsonl"
    outbox = OutboxSender(path)
    before = datetime.now(UTC)

    results = outbox.send([_msg("tok-a", doc="1"), _msg("tok-ü", text="line\nbreak ✓")])
    outbox.send([_msg("tok-c")])

    assert [r.outcome for r in results] == ["sent", "sent"]
    ids = [r.message_id for r in results]
    assert all(i is not None and i.startswith("outbox:") for i in ids)
    assert len(set(ids)) == 2
    lines = _read_jsonl(path)
    assert [line["token"] for line in lines] == ["tok-a", "tok-ü", "tok-c"]
    assert lines[1] == {
        "token": "tok-ü",
        "title": "Title tok-ü",
        "body": "Body for tok-ü",
        "data": {"text": "line\nbreak ✓"},
        "sent_at": lines[1]["sent_at"],
    }
    for line in lines:
        sent_at = datetime.fromisoformat(str(line["sent_at"]))
        assert sent_at.utcoffset() is not None
        assert sent_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert before <= sent_at <= datetime.now(UTC)


def test_outbox_concurrent_threads_write_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    big = "x" * 70_000  # far beyond PIPE_BUF, so unlocked writes could tear
    workers, rounds, per_round = 8, 15, 3
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            outbox = OutboxSender(path)
            barrier.wait()
            for n in range(rounds):
                outbox.send(
                    [
                        _msg(f"w{worker}", seq=str(n * per_round + i), pad=big)
                        for i in range(per_round)
                    ]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    lines = _read_jsonl(path)
    assert len(lines) == workers * rounds * per_round
    for worker in range(workers):
        seqs = [
            int(str(line["data"]["seq"]))  # type: ignore[index]
            for line in lines
            if line["token"] == f"w{worker}"
        ]
        assert seqs == list(range(rounds * per_round))  # each writer's lines whole, in order
    # a batch is appended under one lock: its lines stay adjacent
    for start in range(0, len(lines), per_round):
        assert len({line["token"] for line in lines[start : start + per_round]}) == 1


def _outbox_process(path: str, worker: int, rounds: int) -> None:
    outbox = OutboxSender(Path(path))
    for n in range(rounds):
        outbox.send([_msg(f"p{worker}", seq=str(n), pad="y" * 50_000)])


def test_outbox_concurrent_processes_write_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_outbox_process, args=(str(path), w, 20)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lines = _read_jsonl(path)
    assert len(lines) == 80
    for worker in range(4):
        seqs = [
            int(str(line["data"]["seq"]))  # type: ignore[index]
            for line in lines
            if line["token"] == f"p{worker}"
        ]
        assert seqs == list(range(20))


class _ForwardProxy:
    """A plain-HTTP forward proxy on loopback that records the URLs it relayed."""

    def __init__(self) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        relayed: list[str] = []

        class Relay(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                target = urlsplit(self.path)  # a proxy receives the absolute URL
                relayed.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                upstream = http.client.HTTPConnection(target.hostname or "", target.port,
                                                      timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("proxy-connection", "connection")}
                upstream.request("POST", target.path, body=body, headers=headers)
                answer = upstream.getresponse()
                payload = answer.read()
                upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.relayed = relayed
        self.server = nonblocking(ThreadingHTTPServer(("127.0.0.1", 0), Relay))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_pushes_go_through_the_proxy_the_environment_names(
    stub: FcmStub, service_account: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sender reads the proxy environment once, when it is made (not on every push):
    # a deployment behind an egress proxy must still reach FCM through it.
    proxy = _ForwardProxy()
    try:
        for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                     "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        with FcmSender(service_account, endpoint=stub.base_url) as fcm:
            monkeypatch.delenv("HTTP_PROXY")
            monkeypatch.delenv("http_proxy")
            results = fcm.send([_msg("tok-proxied")])
        assert [r.outcome for r in results] == ["sent"]
        assert len(stub.messages_for("tok-proxied")) == 1
        assert [u for u in proxy.relayed if u.endswith("/messages:send")] == [
            f"{stub.base_url}/v1/projects/docproc-test/messages:send"]
    finally:
        proxy.close()
