"""Health, readiness and metrics for every function however it runs, and logs that let one
document be followed across functions without ever showing a secret."""

from __future__ import annotations

import functools
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from shared.config import Settings
from tests import samples
from tests.conftest import Running
from tests.fcm_stub import FcmStub
from tests.helpers import DRIVER, register_device, settled, upload, wait_for
from tests.processes import BIN, functions_framework, process, settings_env
from tests.services import free_port

pytestmark = pytest.mark.services


def test_pipeline_health_readiness_and_metrics(running: Running, http: requests.Session) -> None:
    assert http.get(running.url("/healthz")).json() == {"status": "ok"}
    ready = http.get(running.url("/readyz"))
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"mongodb": "ok", "rabbitmq": "ok", "redis": "ok"}
    doc_id = upload(http, running.base_url, samples.pdf(), "application/pdf").json()["id"]
    settled(http, running.base_url, doc_id)
    metrics = http.get(running.url("/metrics")).text
    for name in ("docproc_uploads_total", "docproc_upload_bytes_total",
                 "docproc_processing_seconds_bucket", "docproc_events_handled_total",
                 "docproc_http_requests_total", "docproc_notifications_total"):
        assert name in metrics
    assert re.search(r'docproc_uploads_total\{result="accepted"\} [1-9]', metrics)
    assert re.search(r'docproc_processing_seconds_count\{outcome="stored"\} [1-9]', metrics)


def test_functions_alone_answer_probes_and_readiness_follows_the_database(
    service_settings: Callable[..., Settings], tmp_path: Path, http: requests.Session,
) -> None:
    from tests.services import MongoServer

    own = MongoServer(tmp_path / "mongo")
    own.start()
    try:
        env = settings_env(service_settings(mongodb_uri=own.uri))
        docs_base, docs = functions_framework("documents", "documents", "http", env,
                                              tmp_path / "documents.log")
        storage_base, storage = functions_framework("storage", "storage", "cloudevent", env,
                                                    tmp_path / "storage.log")
        ops_port = free_port()
        worker = process([str(BIN / "docproc"), "worker", "notification", "--ops-host",
                          "127.0.0.1", "--ops-port", str(ops_port)], env,
                         log=tmp_path / "worker.log")
        with docs, storage, worker:
            worker_base = f"http://127.0.0.1:{ops_port}"
            wait_for(lambda: _answers(worker_base + "/healthz"), what="the worker's probes")
            for base in (docs_base, storage_base, worker_base):
                assert http.get(base + "/healthz").status_code == 200
                assert http.get(base + "/readyz").status_code == 200, base
                assert "docproc_" in http.get(base + "/metrics").text
            own.stop()
            for base in (docs_base, storage_base, worker_base):
                not_ready = http.get(base + "/readyz", timeout=30)
                assert not_ready.status_code == 503, base
                assert not_ready.json()["checks"]["mongodb"].startswith("unreachable")
                assert http.get(base + "/healthz").status_code == 200  # alive, just not ready
            own.start()
            for base in (docs_base, storage_base, worker_base):
                wait_for(functools.partial(_ready, http, base), timeout=30,
                         what=f"{base} ready again")
    finally:
        own.stop()


def _ready(http: requests.Session, base: str) -> bool:
    return http.get(base + "/readyz", timeout=30).status_code == 200


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def test_json_logs_follow_a_document_across_functions_and_keep_secrets_out(
    service_settings: Callable[..., Settings], fcm: FcmStub, tmp_path: Path,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = service_settings(public_url_override=base)
    env = settings_env(settings)
    env.update({"DOCPROC_LOG_FORMAT": "json", "DOCPROC_LINK_KEY": "L" * 40})
    log = tmp_path / "serve.log"
    mark = samples.marker()
    body = samples.pdf(mark)
    with process([str(BIN / "docproc"), "-v", "serve", "--port", str(port)], env,
                 ready_url=base + "/healthz", log=log) as proc, requests.Session() as http:
        register_device(http, base, "secret-device-token")
        doc_id = upload(http, base, body, "application/pdf").json()["id"]
        doc = settled(http, base, doc_id)
        got = http.get(doc["download_url"], headers=DRIVER)
        assert got.content == body
        wait_for(lambda: fcm.messages_for("secret-device-token"), what="the push")
        wait_for(lambda: "announced DocumentStored" in log.read_text(), what="the notification log")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    about = [line for line in lines if line.get("document_id") == doc_id]
    functions = {line.get("function") for line in about}
    assert {"storage", "notification"} <= functions, functions
    # one trace from the upload request through storage to the push
    pipeline = [line for line in about
                if line.get("function") or line["message"].startswith("accepted document")]
    assert any(line["message"].startswith("accepted document") for line in pipeline)
    traces = {line["traceparent"].split("-")[1] for line in pipeline}
    assert len(traces) == 1, traces
    assert any(line.get("event_id") for line in about)

    text = log.read_text()
    sig = doc["download_url"].split("sig=")[1]
    service_account = json.loads(Path(str(settings.firebase_credentials)).read_text())
    secrets = {
        "link signature": sig,
        "link key": "L" * 40,
        "device token": "secret-device-token",
        "private key": service_account["private_key"].splitlines()[1],
        "access token": "stub-token-",
        "broker password": "guest:guest@",
        "document content": mark.decode(),
    }
    for what, secret in secrets.items():
        assert secret not in text, f"the {what} appears in the logs"
