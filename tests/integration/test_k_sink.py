"""Deployed on Knative, functions publish to K_SINK (the RabbitMQ broker's ingress) over
HTTP in binary content mode; here a local HTTP sink stands in for the broker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from events import http_codec
from events.catalog import DOCUMENT_UPLOADED
from events.cloudevent import validate
from shared.config import Settings
from tests import samples
from tests.conftest import serving
from tests.helpers import nonblocking, upload, wait_for

pytestmark = pytest.mark.services


class Sink:
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_next = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        if self.fail_next:
            self.fail_next -= 1
            return Response("broker busy", status=503)(environ, start_response)
        self.received.append((dict(request.headers), request.get_data()))
        return Response(status=202)(environ, start_response)


@pytest.fixture
def sink() -> Iterator[tuple[Sink, str]]:
    app = Sink()
    server = nonblocking(make_server("127.0.0.1", 0, app, threaded=True))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_upload_publishes_to_k_sink_in_binary_mode(
    service_settings: Callable[..., Settings], sink: tuple[Sink, str], http: requests.Session,
) -> None:
    app, url = sink
    app.fail_next = 1  # the first attempt meets a busy broker and is retried
    with serving(service_settings, consumers=False, amqp_url=None, k_sink=url) as run:
        assert run.svc.settings.k_sink == url.rstrip("/")
        body = samples.pdf(samples.marker())
        doc_id = upload(http, run.base_url, body, "application/pdf").json()["id"]
        wait_for(lambda: app.received, what="the event")
        headers, data = app.received[0]
        assert headers["Ce-Type"] == DOCUMENT_UPLOADED
        assert headers["Ce-Subject"] == doc_id
        assert headers["Ce-Specversion"] == "1.0"
        assert "Ce-Traceparent" in headers
        event = http_codec.decode(headers, data)
        assert validate(event).document_id == doc_id  # type: ignore[attr-defined]
        # confirmed by the sink (202), so it leaves the outbox
        wait_for(lambda: run.svc.documents.get(doc_id).outbox == [], what="an empty outbox")


def test_knative_dead_letters_are_listed_replayed_and_purged(
    service_settings: Callable[..., Settings], sink: tuple[Sink, str], http: requests.Session,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from cloudevents.http import CloudEvent

    from docproc.cli import main
    from docproc.operations import KnativeDeadLetters, dead_letters
    from shared.knative_dead_letters import COLLECTION, record
    from tests.processes import settings_env

    app, url = sink
    with serving(service_settings, consumers=False, amqp_url=None, k_sink=url) as run:
        svc = run.svc
        doc_id = upload(http, run.base_url, samples.pdf(samples.marker()),
                        "application/pdf").json()["id"]
        wait_for(lambda: app.received, what="the upload's event")
        event_id = svc.documents.get(doc_id).upload_event_id
        # What the sink records when Knative gives up: the storage Trigger on this upload,
        # twice (a redelivered dead letter counts up), and one for a document since gone.
        col = svc.mongo.db[COLLECTION]
        for _ in range(2):
            record(col, "storage", CloudEvent({
                "id": event_id, "source": "/docproc", "type": DOCUMENT_UPLOADED,
                "subject": doc_id, "knativeerrorcode": "500",
                "knativeerrordest": "http://docproc-storage.docproc-odd.svc.cluster.local",
                "knativeerrordata": "c3RvcmFnZSBkb3du"}, None))  # "storage down"
        record(col, "storage", CloudEvent({"id": "lost-1", "source": "/docproc",
                                           "type": DOCUMENT_UPLOADED, "subject": "0" * 32}))

        store = dead_letters(svc)
        assert isinstance(store, KnativeDeadLetters)
        first, gone = store.list("storage")
        assert (first.id, first.attempts, first.event["subject"]) == (event_id, 2, doc_id)
        assert "500" in first.reason
        assert "storage down" in first.reason
        assert gone.id == "lost-1"
        assert store.list("notification") == []

        env = settings_env(svc.settings)
        for key in [k for k in env if k.startswith(("DOCPROC_", "MONGODB_", "REDIS_"))]:
            monkeypatch.setenv(key, env[key])
        monkeypatch.delenv("AMQP_URL", raising=False)
        monkeypatch.setenv("K_SINK", url)
        assert main(["dlq", "list", "storage"]) == 0
        assert "2 dead letter(s) for storage" in capsys.readouterr().out

        # Replayed: the document's original event goes to the broker again, the letter goes.
        app.received.clear()
        assert main(["dlq", "replay", "storage", event_id]) == 0
        assert "replayed 1 dead letter(s)" in capsys.readouterr().out
        [(headers, _)] = app.received
        assert (headers["Ce-Id"], headers["Ce-Subject"]) == (event_id, doc_id)
        assert [d.id for d in store.list("storage")] == ["lost-1"]
        # Nothing to send for a document that is gone: the letter stays until purged.
        assert store.replay("storage", None) == 0
        assert store.purge("storage", None) == 1
        assert col.count_documents({}) == 0

        # Replayed again, and failing again before the replay removes the letter: the
        # sink counts the same letter up, and that letter is not removed with the old one.
        failure = CloudEvent({"id": event_id, "source": "/docproc", "type": DOCUMENT_UPLOADED,
                              "subject": doc_id, "knativeerrorcode": "500"}, None)
        record(col, "storage", failure)
        real_publish = svc.publish

        def publish_and_fail_again(event: Any) -> None:
            real_publish(event)
            record(col, "storage", failure)

        monkeypatch.setattr(svc, "publish", publish_and_fail_again)
        assert store.replay("storage", None) == 1
        [again] = store.list("storage")
        assert (again.id, again.attempts) == (event_id, 2)
