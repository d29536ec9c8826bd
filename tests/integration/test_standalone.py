"""Each function runs alone: HTTP and CloudEvent functions under the functions-framework
CLI (as Knative runs them), the notification function under `docproc worker` on RabbitMQ.
Together, as separate processes, they carry a document through the whole flow."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
import requests

from events import amqp_codec, http_codec, topology
from shared.config import Settings
from tests import samples
from tests.fcm_stub import FcmStub
from tests.helpers import DRIVER, register_device, settled, wait_for
from tests.processes import BIN, functions_framework, process, settings_env

pytestmark = pytest.mark.services


def test_functions_as_separate_processes_carry_a_document_end_to_end(
    service_settings: Callable[..., Settings], fcm: FcmStub, tmp_path: Path,
    http: requests.Session,
) -> None:
    settings = service_settings()
    env = settings_env(settings)
    env["DOCPROC_LINK_KEY"] = "k" * 48
    logs = tmp_path / "logs"
    logs.mkdir()
    download_base, download = functions_framework(
        "download", "download_file", "http", env, logs / "download.log")
    with download:
        env["DOCPROC_PUBLIC_URL"] = download_base
        docs_base, docs = functions_framework("documents", "documents", "http", env,
                                              logs / "documents.log")
        users_base, users = functions_framework("users", "users", "http", env,
                                                logs / "users.log")
        storage_base, storage = functions_framework("storage", "storage", "cloudevent", env,
                                                    logs / "storage.log")
        worker = process([str(BIN / "docproc"), "worker", "notification", "--ops-port", "0"], env,
                         log=logs / "worker.log")
        with docs, users, storage, worker:
            register_device(http, users_base, "phone-standalone")
            body = samples.pdf(samples.marker(), pages=2)
            resp = http.post(f"{docs_base}/v1/documents", data=body, timeout=30,
                             headers={**DRIVER, "Content-Type": "application/pdf"})
            assert resp.status_code == 202, resp.text
            doc_id = resp.json()["id"]

            # Deliver document.uploaded from RabbitMQ to the storage function over HTTP, the
            # way a Knative Trigger does: AMQP binding in, CloudEvents HTTP binary mode out.
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url or ""))
            chan = conn.channel()
            queue = topology.queue(settings.amqp_prefix, "storage")
            method, props, message = wait_for(
                lambda: (r := chan.basic_get(queue)) and r[0] and r, what="document.uploaded")
            event = amqp_codec.decode(props, message)
            assert event["subject"] == doc_id
            headers, payload = http_codec.encode(event)
            delivered = http.post(storage_base + "/", data=payload, headers=headers, timeout=30)
            assert delivered.status_code == 200, delivered.text
            chan.basic_ack(method.delivery_tag)
            conn.close()

            doc = settled(http, docs_base, doc_id)
            assert doc["status"] == "stored"
            assert doc["download_url"].startswith(download_base + "/v1/files/")
            got = http.get(doc["download_url"], headers=DRIVER, timeout=30)
            assert got.status_code == 200
            assert got.content == body

            [push] = wait_for(lambda: fcm.messages_for("phone-standalone"), what="the push")
            assert push["data"]["document_id"] == doc_id
            assert push["data"]["download_url"] == doc["download_url"]


GOOD = {"ce-specversion": "1.0", "ce-id": "x-1", "ce-source": "/t",
        "ce-type": "io.docproc.document.uploaded", "Content-Type": "application/json"}
GOOD_DATA = {"document_id": "a" * 32, "owner": "driver-1", "filename": "a.pdf",
             "declared_type": "application/pdf", "size": 3, "sha256": "b" * 64}


@pytest.mark.parametrize(
    ("headers", "data"),
    [
        ({**GOOD, "ce-id": ""}, GOOD_DATA),                                 # missing id
        ({k: v for k, v in GOOD.items() if k != "ce-source"}, GOOD_DATA),   # missing source
        ({**GOOD, "ce-specversion": "0.3"}, GOOD_DATA),                     # wrong version
        ({**GOOD, "ce-type": "com.example.unknown"}, GOOD_DATA),            # unknown type
        (GOOD, {**GOOD_DATA, "document_id": 7}),                             # invalid data
        (GOOD, {**GOOD_DATA, "size": -1}),
        (GOOD, {**GOOD_DATA, "filename": "x" * 100_000}),                    # oversized
        ({"Content-Type": "application/json"}, {"not": "an event"}),         # no CloudEvent
    ],
    ids=["no-id", "no-source", "specversion", "unknown-type", "bad-id", "bad-size",
         "oversized", "not-an-event"],
)
def test_cloudevent_function_refuses_malformed_events(
    service_settings: Callable[..., Settings], tmp_path: Path, http: requests.Session,
    headers: dict[str, str], data: dict[str, object],
) -> None:
    """Events that can never succeed answer 4xx, which Knative does not retry but sends to
    the dead-letter sink, and leave nothing behind."""
    settings = service_settings()
    base, storage = functions_framework("storage", "storage", "cloudevent",
                                        settings_env(settings), tmp_path / "storage.log")
    with storage:
        resp = http.post(base + "/", data=json.dumps(data), timeout=10, headers=headers)
        assert 400 <= resp.status_code < 500, resp.text[:300]
    import pymongo

    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(settings.mongodb_uri)
    assert client[settings.mongodb_database]["documents"].count_documents({}) == 0
    client.close()


def test_worker_refuses_to_start_without_a_broker(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run([str(BIN / "docproc"), "worker", "storage"], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                        "DOCPROC_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "AMQP_URL" in result.stderr


def test_http_only_serve_leaves_the_events_to_worker_processes(
    service_settings: Callable[..., Settings], fcm: FcmStub, tmp_path: Path,
    http: requests.Session,
) -> None:
    """The deployed shape on one machine: two gunicorn processes answer HTTP and publish,
    `docproc worker` processes consume; nothing is stored before a storage worker runs."""
    from tests.processes import children
    from tests.services import free_port

    settings = service_settings()
    env = settings_env(settings)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env["DOCPROC_PUBLIC_URL"] = base
    serve = process([str(BIN / "docproc"), "serve", "--port", str(port), "--http-only",
                     "--processes", "2"], env, ready_url=base + "/readyz",
                    log=tmp_path / "serve.log")
    with serve as server:
        assert len(children(server.pid)) == 2
        register_device(http, base, "phone-split")
        body = samples.pdf(samples.marker())
        resp = http.post(f"{base}/v1/documents", data=body, timeout=30,
                         headers={**DRIVER, "Content-Type": "application/pdf"})
        assert resp.status_code == 202, resp.text
        doc_id = resp.json()["id"]
        with pytest.raises(AssertionError):  # nobody in `serve` consumes document.uploaded
            settled(http, base, doc_id, timeout=2)
        storage = process([str(BIN / "docproc"), "worker", "storage", "--ops-port", "0"], env,
                          log=tmp_path / "storage.log")
        notification = process([str(BIN / "docproc"), "worker", "notification",
                                "--ops-port", "0"], env, log=tmp_path / "notification.log")
        with storage, notification:
            assert settled(http, base, doc_id)["status"] == "stored"
            [push] = wait_for(lambda: fcm.messages_for("phone-split"), what="the push")
            assert push["data"]["document_id"] == doc_id


def test_http_only_serve_needs_a_broker_and_a_database_server(tmp_path: Path) -> None:
    import subprocess

    for extra in (["--http-only"], ["--processes", "2"]):
        result = subprocess.run([str(BIN / "docproc"), "serve", *extra], capture_output=True,
                                text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                            "DOCPROC_DATA_DIR": str(tmp_path)})
        assert result.returncode == 2, result.stderr
        assert "AMQP_URL and MONGODB_URI" in result.stderr
