"""Faults the pipeline survives, each injected on the real services, counted afterwards:
accepted = stored + rejected, nothing lost, nothing stored or announced twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pymongo
import pytest
import requests

from docproc.operations import dead_letters
from shared.blobstore import Area
from shared.config import Settings
from shared.deliveries import device_key
from tests import samples
from tests.conftest import Running, serving
from tests.fcm_stub import FcmStub
from tests.helpers import DRIVER, register_device, settled, upload, wait_for
from tests.processes import BIN, process, settings_env
from tests.services import MongoServer, free_port

pytestmark = pytest.mark.services


def _upload_many(run: Running, count: int, workers: int = 6,
                 during: Callable[[int], None] | None = None) -> list[str]:
    """Upload ``count`` documents concurrently; ``during(i)`` runs after the i-th is accepted."""
    accepted: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with requests.Session() as http:
            resp = upload(http, run.base_url, samples.pdf(samples.marker()), "application/pdf",
                          filename=f"burst-{i}.pdf")
        assert resp.status_code == 202, resp.text
        with lock:
            accepted.append(resp.json()["id"])
            n = len(accepted)
        if during is not None:
            during(n)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return accepted


def _all_settled(run: Running, ids: list[str], timeout: float = 60) -> Counter[str]:
    with requests.Session() as http:
        return Counter(settled(http, run.base_url, i, timeout=timeout)["status"] for i in ids)


def _pushes_per_document(fcm: FcmStub, token: str) -> Counter[str]:
    return Counter(m["data"]["document_id"] for m in fcm.messages_for(token))


def _wait_in_log(log: Path, text: str) -> None:
    wait_for(lambda: text in log.read_text(), timeout=30, what=f"{text!r} in {log.name}")


def _assert_once_each(run: Running, fcm: FcmStub, token: str, ids: list[str]) -> None:
    """Every document stored exactly once and announced exactly once."""
    started = time.monotonic()
    assert _all_settled(run, ids) == Counter({"stored": len(ids)})
    wait_for(lambda: set(_pushes_per_document(fcm, token)) >= set(ids), timeout=60,
             what="every push")
    # Reported for the record (run with -s): how long the pipeline took to catch up.
    print(f"\n{len(ids)} documents stored and announced {time.monotonic() - started:.1f} s "
          "after the fault was over")
    time.sleep(1.0)  # time for a duplicate to show up, if one were coming
    pushes = _pushes_per_document(fcm, token)
    assert {i: pushes[i] for i in ids} == dict.fromkeys(ids, 1)
    objects = [p for p in (run.svc.settings.efs_root / "objects").rglob("*") if p.is_file()]
    assert sorted(p.name for p in objects) == sorted(ids)
    assert not [p for p in (run.svc.settings.efs_root / "staging").rglob("*") if p.is_file()]


def test_workers_killed_mid_burst_lose_and_duplicate_nothing(
    service_settings: Callable[..., Settings], fcm: FcmStub, tmp_path: Path,
) -> None:
    with serving(service_settings, consumers=False) as run, requests.Session() as http:
        register_device(http, run.base_url, "burst-phone")
        env = settings_env(run.svc.settings)
        logs = tmp_path

        def worker(name: str, n: int) -> Any:
            return process([str(BIN / "docproc"), "worker", name, "--ops-port", "0"], env,
                           log=logs / f"{name}-{n}.log")

        killed: list[str] = []
        with worker("storage", 1) as storage, worker("notification", 1) as notification:
            def kill(n: int) -> None:
                if n == 12:
                    storage.send_signal(signal.SIGKILL)
                    killed.append("storage")
                if n == 20:
                    notification.send_signal(signal.SIGKILL)
                    killed.append("notification")

            ids = _upload_many(run, 40, during=kill)
            assert killed == ["storage", "notification"]
            with worker("storage", 2), worker("notification", 2):
                _assert_once_each(run, fcm, "burst-phone", ids)


def test_rabbitmq_restart_during_uploads_and_processing(
    running: Running, fcm: FcmStub, http: requests.Session,
) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or os.geteuid() != 0:
        pytest.fail("restarting RabbitMQ needs rabbitmqctl as root", pytrace=False)
    register_device(http, running.base_url, "restart-phone")
    outage = {"during": 0}

    def restart(n: int) -> None:
        if n == 10:
            subprocess.run([ctl, "stop_app"], check=True, capture_output=True, timeout=60)
        if 10 < n <= 20:
            outage["during"] += 1  # accepted while the broker was down
        if n == 20:
            subprocess.run([ctl, "start_app"], check=True, capture_output=True, timeout=120)
            subprocess.run([ctl, "await_startup"], check=True, capture_output=True, timeout=120)

    try:
        ids = _upload_many(running, 30, workers=1, during=restart)
    finally:
        subprocess.run([ctl, "start_app"], capture_output=True, timeout=120)
    assert outage["during"] == 10
    _assert_once_each(running, fcm, "restart-phone", ids)


def test_mongodb_outage_refuses_uploads_and_in_flight_events_finish_after(
    service_settings: Callable[..., Settings], fcm: FcmStub, tmp_path: Path,
) -> None:
    own = MongoServer(tmp_path / "own-mongo")
    own.start()
    try:
        # Long enough backoff (1+2+4+8 s) to outlast the outage without dead-lettering.
        with serving(service_settings, consumers=False, mongodb_uri=own.uri,
                     retry_delays=(1.0, 2.0, 4.0, 8.0)) as run, requests.Session() as http:
            register_device(http, run.base_url, "outage-phone")
            ids = _upload_many(run, 5)  # queued in RabbitMQ, nobody consuming yet
            own.stop()
            refused = upload(http, run.base_url, samples.pdf(), "application/pdf")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"]
            staged = [p for p in (run.svc.settings.efs_root / "staging").rglob("*")
                      if p.is_file()]
            assert sorted(p.name for p in staged) == sorted(ids)  # nothing of the refused one
            env = settings_env(run.svc.settings)
            worker = [str(BIN / "docproc"), "worker"]
            logs = {name: tmp_path / f"{name}.log" for name in ("storage", "notification")}
            with process([*worker, "storage", "--ops-port", "0"], env,
                         log=logs["storage"]) as storage, \
                    process([*worker, "notification", "--ops-port", "0"], env,
                            log=logs["notification"]):
                # Workers started while the database is away wait for it (they used to
                # exit with a traceback, leaving the events to nobody).
                for log in logs.values():
                    _wait_in_log(log, "waiting for the database")
                own.start()
                _assert_once_each(run, fcm, "outage-phone", ids)

                # Events a running worker has taken when the database goes away are retried
                # through the outage. Stopped, the worker holds them unhandled until then.
                storage.send_signal(signal.SIGSTOP)
                try:
                    more = _upload_many(run, 5)
                    own.stop()
                finally:
                    storage.send_signal(signal.SIGCONT)
                _wait_in_log(logs["storage"], "handler failed")  # against the stopped database
                own.start()
                _assert_once_each(run, fcm, "outage-phone", ids + more)
            assert "Traceback" not in logs["storage"].read_text()
            store = dead_letters(run.svc)  # retried through the outage, never dead-lettered
            assert store.list("storage") == store.list("notification") == []
    finally:
        own.stop()


def test_redis_unreachable_everything_works(service_settings: Callable[..., Settings],
                                            fcm: FcmStub, http: requests.Session) -> None:
    with serving(service_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0") as run:
        register_device(http, run.base_url, "no-redis-phone")
        ids = _upload_many(run, 3)
        _assert_once_each(run, fcm, "no-redis-phone", ids)
        assert http.get(run.url("/v1/users/me"), headers=DRIVER).status_code == 200


def test_fcm_throttling_is_retried_after_its_retry_after_and_delivered_once(
    service_settings: Callable[..., Settings], fcm: FcmStub, http: requests.Session,
) -> None:
    with serving(service_settings, retry_delays=(0.2, 1.0, 2.0)) as run:
        register_device(http, run.base_url, "busy-phone")
        register_device(http, run.base_url, "old-phone")
        fcm.unregister("old-phone")
        fcm.fail_next(2, 429, retry_after=1)  # both devices are throttled at first
        started = time.monotonic()
        doc_id = upload(http, run.base_url, samples.pdf(), "application/pdf").json()["id"]
        wait_for(lambda: fcm.messages_for("busy-phone"), what="the push")
        assert time.monotonic() - started >= 1.0  # waited out FCM's Retry-After
        wait_for(lambda: (run.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
                 == "completed", what="the delivery")
        time.sleep(0.5)
        assert len(fcm.messages_for("busy-phone")) == 1
        user = run.svc.users.get("driver-1")
        assert user is not None
        assert [d.token for d in user.devices] == ["busy-phone"]  # the dead token is gone


def test_a_retry_after_one_device_was_throttled_reaches_only_that_device(
    service_settings: Callable[..., Settings], fcm: FcmStub, http: requests.Session,
) -> None:
    with serving(service_settings, retry_delays=(0.2, 1.0, 2.0)) as run:
        phones = ["phone-" + "a" * 150, "phone-" + "b" * 150]
        for phone in phones:
            register_device(http, run.base_url, phone)
        fcm.fail_next(1, 429, retry_after=1)  # whichever device goes first is throttled
        doc_id = upload(http, run.base_url, samples.pdf(), "application/pdf").json()["id"]
        wait_for(lambda: (run.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
                 == "completed", what="the delivery")
        time.sleep(0.5)
        assert [len(fcm.messages_for(phone)) for phone in phones] == [1, 1]
        delivery = run.svc.deliveries.get(f"{doc_id}.stored")
        assert delivery is not None
        assert delivery["attempts"] == 2
        assert delivery["outcome"]["sent"] == 2
        assert sorted(s["device"] for s in delivery["sent"]) == sorted(map(device_key, phones))
        assert not any(phone in repr(delivery) for phone in phones)  # digests, never tokens


def test_fcm_that_keeps_failing_is_dead_lettered_not_retried_forever(
    service_settings: Callable[..., Settings], fcm: FcmStub, http: requests.Session,
) -> None:
    with serving(service_settings) as run:
        register_device(http, run.base_url, "doomed-phone")
        fcm.fail_next(1000, 503)
        doc_id = upload(http, run.base_url, samples.pdf(), "application/pdf").json()["id"]
        [letter] = wait_for(lambda: dead_letters(run.svc).list("notification"), timeout=30,
                            what="the dead letter")
        assert letter.event["subject"] == doc_id
        assert "PushNotDelivered" in letter.reason
        assert letter.attempts == len(run.svc.settings.retry_delays) + 1
        fcm.fail_next(0)
        assert settled(http, run.base_url, doc_id)["status"] == "stored"


def test_docproc_serve_killed_right_after_202s_finishes_everything(tmp_path: Path) -> None:
    """The embedded default: no broker, no database server; a SIGKILL right after the last
    202 loses nothing, and a restart finishes every accepted document exactly once."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOCPROC_", "AMQP_", "MONGODB_", "REDIS_", "FIREBASE_"))}
    env.update({"DOCPROC_DATA_DIR": str(tmp_path / "data"), "DOCPROC_PUBLIC_URL": base})
    serve = [str(BIN / "docproc"), "serve", "--port", str(port)]
    ids: list[str] = []
    with process(serve, env, ready_url=base + "/healthz", log=tmp_path / "serve-1.log") as proc, \
            requests.Session() as http:
        register_device(http, base, "embedded-phone")
        for i in range(15):
            resp = upload(http, base, samples.pdf(samples.marker()), "application/pdf",
                          filename=f"k-{i}.pdf")
            assert resp.status_code == 202
            ids.append(resp.json()["id"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with process(serve, env, ready_url=base + "/healthz", log=tmp_path / "serve-2.log"), \
            requests.Session() as http:
        statuses = Counter(settled(http, base, i, timeout=60)["status"] for i in ids)
        assert statuses == Counter({"stored": len(ids)})
        outbox = tmp_path / "data" / "outbox" / "notifications.jsonl"

        def announced() -> Counter[str]:
            import json

            lines = outbox.read_text().splitlines() if outbox.exists() else []
            return Counter(json.loads(line)["data"]["document_id"] for line in lines)

        wait_for(lambda: set(announced()) >= set(ids), timeout=60, what="every notification")
        time.sleep(1.0)
        assert {i: announced()[i] for i in ids} == dict.fromkeys(ids, 1)
    objects = [p.name for p in (tmp_path / "data" / "efs" / Area.OBJECTS.value).rglob("*")
               if p.is_file()]
    assert sorted(objects) == sorted(ids)


def test_an_idle_worker_stops_at_once_on_sigterm(service_settings: Callable[..., Settings],
                                                 tmp_path: Path) -> None:
    """Kubernetes sends SIGTERM and kills what is still running after its grace period: a
    worker waiting for messages must notice the signal without one arriving."""
    env = settings_env(service_settings())
    log = tmp_path / "storage.log"
    with process([str(BIN / "docproc"), "worker", "storage", "--ops-port", "0"], env,
                 log=log) as proc:
        wait_for(lambda: "storage: consuming" in log.read_text(), what="the worker consuming")
        time.sleep(1.0)  # idle: nothing to consume
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_a_failure_removing_dead_tokens_does_not_push_twice_to_the_others(
    service_settings: Callable[..., Settings], fcm: FcmStub, http: requests.Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database fails just as the tokens FCM calls unregistered are dropped: the pushes
    that went out stay recorded, and nothing is sent to those devices again."""
    with serving(service_settings, retry_delays=(0.2, 1.0, 2.0)) as run:
        for phone in ("phone-a", "phone-b", "phone-gone"):
            register_device(http, run.base_url, phone)
        fcm.unregister("phone-gone")

        def database_fails(*_args: Any) -> int:
            raise pymongo.errors.AutoReconnect("connection closed")

        monkeypatch.setattr(run.svc.users, "remove_tokens", database_fails)
        doc_id = upload(http, run.base_url, samples.pdf(), "application/pdf").json()["id"]
        wait_for(lambda: (run.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
                 == "completed", what="the delivery")
        time.sleep(1.0)  # time for a retry to push again, if one were coming
        assert [len(fcm.messages_for(p)) for p in ("phone-a", "phone-b")] == [1, 1]
        delivery = run.svc.deliveries.get(f"{doc_id}.stored")
        assert delivery is not None
        assert (delivery["attempts"], delivery["outcome"]["unregistered"]) == (1, 1)
        # Left for the next push, which reports it unregistered again.
        monkeypatch.undo()
        second = upload(http, run.base_url, samples.pdf(samples.marker()), "application/pdf")
        assert settled(http, run.base_url, second.json()["id"])["status"] == "stored"


        def tokens() -> list[str]:
            user = run.svc.users.get("driver-1")
            return [d.token for d in user.devices] if user else []

        wait_for(lambda: tokens() == ["phone-a", "phone-b"], what="the dead token dropped")


def test_a_retry_after_longer_than_every_holding_queue_is_waited_out_in_full(
    service_settings: Callable[..., Settings], fcm: FcmStub, http: requests.Session,
) -> None:
    """FCM asks for more time than the longest retry queue holds an event: the event goes
    round that queue again, unhandled, until it is due, and the hops spend no attempts
    (before, each hop was an attempt, and the push was dead-lettered while FCM still said
    "not yet")."""
    with serving(service_settings, retry_delays=(0.2, 0.4)) as run:
        register_device(http, run.base_url, "patient-phone")
        fcm.fail_next(1, 429, retry_after=3)
        started = time.monotonic()
        doc_id = upload(http, run.base_url, samples.pdf(), "application/pdf").json()["id"]
        wait_for(lambda: fcm.messages_for("patient-phone"), timeout=30, what="the push")
        assert time.monotonic() - started >= 3.0
        wait_for(lambda: (run.svc.deliveries.get(f"{doc_id}.stored") or {}).get("state")
                 == "completed", what="the delivery")
        time.sleep(0.5)
        assert len(fcm.messages_for("patient-phone")) == 1
        delivery = run.svc.deliveries.get(f"{doc_id}.stored")
        assert delivery is not None
        assert delivery["attempts"] == 2  # the throttled one and the one after the wait
        assert dead_letters(run.svc).list("notification") == []
