"""Processes that start while MongoDB does not answer: long-running ones wait for it and say
so in one line, functions stay alive and answer 503, one-off commands fail in one line."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from shared.config import Settings
from tests import samples
from tests.helpers import DRIVER, wait_for
from tests.processes import BIN, functions_framework, settings_env
from tests.services import MongoServer, free_port

pytestmark = pytest.mark.services


def _dead_database_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = settings_env(settings)
    env["MONGODB_URI"] = f"mongodb://127.0.0.1:{free_port()}/"  # nothing listens there
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "docproc"), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_worker_gives_up_on_a_database_that_never_answers_in_one_line(
    service_settings: Callable[..., Settings],
) -> None:
    # Each try takes the 3 s pymongo waits for a server: 5 s leaves room for a second.
    env = _dead_database_env(service_settings(), DOCPROC_STARTUP_WAIT_SECONDS="5")
    result = _run(["worker", "storage", "--ops-port", "0"], env)
    assert result.returncode == 1, result.stderr
    assert "waiting for the database" in result.stderr  # it did wait, and said so
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("docproc: database unreachable: 127.0.0.1:"), last
    assert "Connection refused" in last
    assert "Topology" not in last
    assert "Traceback" not in result.stderr


def test_one_off_command_fails_at_once_in_one_line(
    service_settings: Callable[..., Settings],
) -> None:
    env = _dead_database_env(service_settings(), DOCPROC_STARTUP_WAIT_SECONDS="600")
    result = _run(["dlq", "list", "storage"], env)
    assert result.returncode == 1, result.stderr
    assert "waiting for the database" not in result.stderr  # no wait for a one-off command
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("docproc: ")]
    assert "docproc: database unreachable: 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_gives_up_on_a_database_that_never_answers(
    service_settings: Callable[..., Settings],
) -> None:
    env = _dead_database_env(service_settings(), DOCPROC_STARTUP_WAIT_SECONDS="2")
    result = _run(["serve", "--http-only", "--port", str(free_port())], env)
    assert result.returncode != 0
    assert "database unreachable after 2 s: 127.0.0.1:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_http_function_started_before_the_database_stays_alive_and_answers_503(
    service_settings: Callable[..., Settings], tmp_path: Path, http: requests.Session,
) -> None:
    """Under Knative a function whose first requests cannot build its services must still
    pass its liveness probe (else the kubelet restarts it into a crash loop for as long as
    the database is away) and tell clients to come back, then work once the database does."""
    own = MongoServer(tmp_path / "late-mongo")  # its port is chosen; nothing listens yet
    env = settings_env(service_settings(mongodb_uri=own.uri))
    base, documents = functions_framework("documents", "documents", "http", env,
                                          tmp_path / "documents.log")
    try:
        with documents:
            live = http.get(f"{base}/healthz", timeout=2)  # under the probe's 3 s timeout
            assert live.status_code == 200
            assert live.json() == {"status": "ok"}
            ready = http.get(f"{base}/readyz", timeout=10)
            assert ready.status_code == 503
            assert ready.json()["checks"]["mongodb"].startswith("unreachable")
            assert http.get(f"{base}/metrics", timeout=2).status_code == 200
            # Probes arriving together each get their answer within the readiness probe's
            # 5 s timeout (they queued for 3 s each behind one another).
            with ThreadPoolExecutor(5) as pool:
                answers = list(pool.map(
                    lambda _: requests.get(f"{base}/readyz", timeout=5).status_code, range(5)))
            assert answers == [503] * 5
            body = samples.pdf(samples.marker())
            refused = http.post(f"{base}/v1/documents", data=body, timeout=10,
                                headers={**DRIVER, "Content-Type": "application/pdf"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"]
            assert refused.json()["error"]["code"] == "unavailable"

            own.start()

            def accepted_upload() -> requests.Response | None:
                resp = http.post(f"{base}/v1/documents", data=body, timeout=10,
                                 headers={**DRIVER, "Content-Type": "application/pdf"})
                return resp if resp.status_code == 202 else None

            accepted = wait_for(accepted_upload, timeout=30, what="the upload to be accepted")
            doc_id = accepted.json()["id"]
            status = http.get(f"{base}/v1/documents/{doc_id}", headers=DRIVER, timeout=10)
            assert status.status_code == 200
            assert status.json()["status"] == "processing"
            assert http.get(f"{base}/readyz", timeout=10).status_code == 200
        assert "Traceback" not in (tmp_path / "documents.log").read_text()
    finally:
        own.stop()


def test_cloudevent_function_started_before_the_database_answers_503_to_be_retried(
    service_settings: Callable[..., Settings], tmp_path: Path, http: requests.Session,
) -> None:
    """eventing-rabbitmq retries a 5xx with backoff; the function stays alive meanwhile."""
    env = _dead_database_env(service_settings())
    base, storage = functions_framework("storage", "storage", "cloudevent", env,
                                        tmp_path / "storage.log")
    event = {"ce-specversion": "1.0", "ce-id": "start-1", "ce-source": "/test",
             "ce-type": "io.docproc.document.uploaded", "Content-Type": "application/json"}
    data = {"document_id": "a" * 32, "owner": "driver-1", "filename": "a.pdf",
            "declared_type": "application/pdf", "size": 3, "sha256": "b" * 64}
    with storage:
        assert http.get(f"{base}/healthz", timeout=2).status_code == 200
        assert http.get(f"{base}/readyz", timeout=10).status_code == 503
        for headers in (event, {**event, "ce-type": "com.example.unknown"}):
            # A malformed event is kept as a dead letter in the database: with none to keep
            # it in, it too must be retried rather than dropped.
            resp = http.post(base + "/", json=data, headers=headers, timeout=10)
            assert resp.status_code == 503, resp.text[:300]
    log = (tmp_path / "storage.log").read_text()
    assert "database unavailable: 127.0.0.1:" in log
    assert "Traceback" not in log
