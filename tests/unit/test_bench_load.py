"""The benchmark's load generator: uploads reach the server whole, and each client thread
keeps its connection (as Kong's upstream pool does) unless told to make one per upload."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench import documents
from bench.load import Client, run_step
from tests.helpers import nonblocking

SIZE = 4096


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn answers
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.bodies.append(body)
            number = len(self.server.bodies)
        answer = json.dumps({"id": f"doc-{number}"}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = nonblocking(_Server())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize(("fresh", "connections"), [(False, 2), (True, 12)])
def test_uploads_arrive_whole_over_kept_or_fresh_connections(
        server: _Server, fresh: bool, connections: int) -> None:
    client = Client("127.0.0.1", server.server_address[1], ["driver-a", "driver-b"], "t",
                    timeout=10.0, fresh_connections=fresh)
    uploads = run_step(client, "small", SIZE, count=12, rate=None, concurrency=2,
                       first_index=0)
    assert client.errors == []
    assert all(u.accepted for u in uploads)
    assert sorted(u.doc_id or "" for u in uploads) == sorted(f"doc-{n}" for n in range(1, 13))
    expected = {documents.whole(documents.mark("t", "small", i), SIZE) for i in range(12)}
    assert set(server.bodies) == expected
    assert len(server.bodies) == 12
    assert server.connections == connections


def test_an_idle_connection_is_made_anew(server: _Server,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The server may close a connection idle for longer than its keep-alive timeout.
    monkeypatch.setattr("bench.load.IDLE_REUSE_SECONDS", 0.0)
    client = Client("127.0.0.1", server.server_address[1], ["driver-a"], "t", timeout=10.0)
    uploads = run_step(client, "small", SIZE, count=3, rate=20.0, concurrency=1,
                       first_index=0)
    assert all(u.accepted for u in uploads)
    assert server.connections == 3
