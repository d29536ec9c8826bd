"""Open-loop load: uploads sent at fixed, scheduled times whatever the server's pace.

Document ``i`` of a step is due at ``start + i / rate``. A pool of ``concurrency`` client
threads takes the documents in order; a free thread waits until the next one is due and
sends it, so when the server slows down, the waiting shows up as latency instead of as a
lower offered rate (as long as a thread is free; the time a document waited past its due
time for a free thread is reported as the client lag). ``rate=None`` sends as fast as the
threads allow (closed loop).

Each client thread keeps its HTTP/1.1 connection open from one upload to the next, as
deployed the function's callers do: Kong's upstream pool and Knative's queue-proxy hold
keep-alive connections to it, so it never sees a connection per upload (a fresh one costs the
server 0.4 ms of CPU, bench/README.md, Findings 33). ``fresh_connections`` makes one per
upload instead, as a phone talking to the server directly would. Bodies go with a
Content-Length; the latency to the 202 runs from the moment the first byte is handed to the
socket (the connection is made before) to the end of the response.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bench import documents

# A connection idle for longer is made anew before the next upload: gunicorn closes
# keep-alive connections after 2 s idle, and one closed under a request in flight would
# count as a failed upload.
IDLE_REUSE_SECONDS = 1.0


@dataclass
class Upload:
    index: int
    user: str
    scheduled: float  # time.time() it was due
    started: float = 0.0  # time.time() of the first byte
    accept_seconds: float | None = None  # first byte -> end of the 202 response
    status: int | None = None
    doc_id: str | None = None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 202 and self.doc_id is not None

    @property
    def lag(self) -> float:
        return max(self.started - self.scheduled, 0.0)


@dataclass
class Client:
    host: str
    port: int
    users: list[str]
    run_id: str
    timeout: float = 600.0
    fresh_connections: bool = False
    errors: list[str] = field(default_factory=list)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's open connection, or a new one (made before the clock starts)."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - self._local.used > IDLE_REUSE_SECONDS:
            self.drop_connection()
            conn = None
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            conn.connect()
            self._local.conn = conn
        return conn

    def drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def send(self, upload: Upload, label: str, size: int) -> None:
        marker = documents.mark(self.run_id, label, upload.index)
        body: bytes | Iterable[bytes]
        # Small bodies are made before the clock starts; large ones stream from a generator.
        body = documents.whole(marker, size) if size <= 8 * 1024 * 1024 else \
            documents.parts(marker, size)
        length = documents.document_size(size)
        headers = {
            "X-Consumer-Username": upload.user,
            "X-Consumer-Groups": "drivers",
            "Content-Type": "application/pdf",
            "X-Filename": f"{label}-{upload.index}.pdf",
            "Content-Length": str(length),
        }
        keep = False
        try:
            conn = self._connection()
            upload.started = time.time()
            began = time.perf_counter()
            conn.request("POST", "/v1/documents", body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            upload.accept_seconds = time.perf_counter() - began
            keep = not (self.fresh_connections or resp.will_close)
            upload.status = resp.status
            if resp.status == 202:
                upload.doc_id = str(json.loads(payload)["id"])
            else:
                upload.error = f"HTTP {resp.status}: {payload[:300]!r}"
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            upload.error = f"{type(exc).__name__}: {exc}"
        finally:
            if keep:
                self._local.used = time.monotonic()
            else:
                self.drop_connection()
        if upload.error:
            self.errors.append(f"{label}#{upload.index}: {upload.error}")


def run_step(client: Client, label: str, size: int, count: int, rate: float | None,
             concurrency: int, first_index: int,
             on_sent: Callable[[Upload], None] | None = None) -> list[Upload]:
    """Send ``count`` uploads at ``rate`` per second (None: closed loop) with ``concurrency``
    client threads; returns them once every one has answered (or failed)."""
    start = time.time() + 0.2
    uploads = [
        Upload(index=first_index + i, user=client.users[(first_index + i) % len(client.users)],
               scheduled=start + (i / rate if rate else 0.0))
        for i in range(count)
    ]
    lock = threading.Lock()
    cursor = iter(uploads)

    def worker() -> None:
        try:
            for _ in range(count):  # bounded: each pass takes one upload or ends
                with lock:
                    upload = next(cursor, None)
                if upload is None:
                    return
                delay = upload.scheduled - time.time()
                if delay > 0:
                    time.sleep(delay)
                client.send(upload, label, size)
                if on_sent is not None:
                    on_sent(upload)
        finally:
            client.drop_connection()

    threads = [threading.Thread(target=worker, name=f"client-{n}", daemon=True)
               for n in range(min(concurrency, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(client.timeout + (count / rate if rate else 0.0) + 60)
    return uploads
