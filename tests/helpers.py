"""Client-side helpers for the HTTP contract, as Kong would forward requests."""

from __future__ import annotations

import socket
import socketserver
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import requests
from pymongo import monitoring

T = TypeVar("T")


class Commands(monitoring.CommandListener):
    """Counts the commands of one kind (``update``, ``find``...) a MongoDB client sends,
    to one collection or to any."""

    def __init__(self, name: str, collection: str | None = None) -> None:
        self.name = name
        self.collection = collection
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == self.name and (
                self.collection is None or event.command.get(self.name) == self.collection):
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def kong(user: str, group: str = "drivers") -> dict[str, str]:
    return {"X-Consumer-Username": user, "X-Consumer-Groups": group}


DRIVER = kong("driver-1")
OTHER_DRIVER = kong("driver-2")
AGENT = kong("agent-1", "agents")


def upload(http: requests.Session, base: str, body: bytes, media_type: str,
           filename: str = "doc", headers: dict[str, str] | None = None) -> requests.Response:
    return http.post(f"{base}/v1/documents", data=body, timeout=60, headers={
        "X-Filename": filename, **(headers or DRIVER), "Content-Type": media_type})


def wait_for(check: Callable[[], T | None], timeout: float = 20.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def settled(http: requests.Session, base: str, doc_id: str,
            headers: dict[str, str] | None = None, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the document until it leaves `processing`."""

    def check() -> dict[str, Any] | None:
        resp = http.get(f"{base}/v1/documents/{doc_id}", headers=headers or DRIVER, timeout=10)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return None if body["status"] == "processing" else body

    return wait_for(check, timeout, f"document {doc_id} to settle")


def register_device(http: requests.Session, base: str, token: str,
                    headers: dict[str, str] | None = None) -> None:
    resp = http.post(f"{base}/v1/users/me/devices", headers=headers or DRIVER, timeout=10,
                     json={"token": token, "platform": "android"})
    assert resp.status_code in (200, 201), resp.text


S = TypeVar("S", bound=socketserver.BaseServer)


def nonblocking(server: S) -> S:
    """``server`` with a non-blocking listening socket. serve_forever accepts once select
    says a connection waits; should none be there by then, a blocking accept waits for the
    next one and ``shutdown`` for ever (a test hung so in CI)."""
    cast(socket.socket, server.socket).setblocking(False)  # type: ignore[attr-defined]
    return server
