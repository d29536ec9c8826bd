"""The floor: the least work one document needs on this machine with these services, done by
a plain script with no framework, so the pipeline's figures can be read as a ratio to it.

Per document, in the pipeline's order:

1. read the bytes (from a file in the page cache, 256 KiB reads, as the upload reads its
   request body);
2. encrypt them with AES-256-GCM (``cryptography``'s AESGCM, a fresh 256-bit key, 64 KiB
   chunks, STREAM-style nonces) into a file, then ``fsync`` it and drop its pages from the
   page cache (the pipeline's storage does so once it has read a stored object);
3. insert the document's record into MongoDB;
4. publish ``document.uploaded``, persistent, to a durable topic exchange bound to a durable
   queue, and wait for the broker's confirm;
5. update the record to ``stored``;
6. publish ``document.stored`` the same way;
7. one FCM HTTP v1 send (a plain HTTP POST with a bearer token) to the loopback FCM stub.

Not in the floor (the pipeline does them, the issue's floor does not count them): hashing,
verifying and inspecting the stored bytes, the rename into place, indexes beyond ``_id``,
consuming the events, the user lookup.

Each size is measured sequentially (one document after the other) and with ``concurrency``
threads (each with its own broker channel and HTTP session; one MongoDB client). The files
it writes stay until the whole floor is measured, as a pipeline keeps what it stored: on
this machine, pages freed by deleting a batch's files come back cheap to the next batch
for a few seconds (bench/README.md, Finding 25). What both the floor and the pipeline do
get is the pages of each document once it is written and read (Finding 28).
Run by
bench/run.py; alone::

    .venv/bin/python -m bench.floor --amqp-url amqp://guest:guest@127.0.0.1:5672/%2F \\
        --mongodb-uri mongodb://127.0.0.1:PORT/ --fcm-dir DIR --work-dir DIR \\
        --spec '[{"name": "small", "size": 65536, "sequential": 100, "concurrent": 200,
                  "concurrency": 16}]'
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import secrets
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import requests
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pymongo import MongoClient

from bench import documents
from bench.stats import latency_summary

CHUNK = 64 * 1024
READ = 256 * 1024
MIB = 1024 * 1024
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
UPLOADED = "io.docproc.document.uploaded"
STORED = "io.docproc.document.stored"


@dataclass(frozen=True)
class SizeSpec:
    name: str
    size: int
    sequential: int
    concurrent: int
    concurrency: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Fcm:
    """A bearer token from the stub's token endpoint, then plain POSTs to messages:send."""

    def __init__(self, fcm_dir: Path) -> None:
        self.base = (fcm_dir / "base_url").read_text().strip()
        account = json.loads((fcm_dir / "service-account.json").read_text())
        self.project = account["project_id"]
        now = int(time.time())
        claims = {"iss": account["client_email"], "aud": account["token_uri"], "iat": now,
                  "exp": now + 3600, "scope": "https://www.googleapis.com/auth/firebase.messaging"}
        # The stub decodes but does not verify the assertion; Google would check the signature.
        assertion = ".".join([_b64(b'{"alg":"RS256","typ":"JWT"}'),
                              _b64(json.dumps(claims).encode()), _b64(b"unsigned")])
        resp = requests.post(account["token_uri"], timeout=10,
                             data={"grant_type": JWT_BEARER, "assertion": assertion})
        resp.raise_for_status()
        self.token = resp.json()["access_token"]
        self.url = f"{self.base}/v1/projects/{self.project}/messages:send"

    def send(self, session: requests.Session, doc_id: str) -> None:
        body = {"message": {"token": "floor-device",
                            "notification": {"title": "Document stored",
                                             "body": "floor.pdf is stored and ready."},
                            "data": {"document_id": doc_id, "status": "stored"}}}
        resp = session.post(self.url, json=body, timeout=30,
                            headers={"Authorization": f"Bearer {self.token}"})
        resp.raise_for_status()


class Floor:
    def __init__(self, amqp_url: str, mongodb_uri: str, database: str, fcm_dir: Path,
                 work_dir: Path) -> None:
        self.params = pika.URLParameters(amqp_url)
        self.prefix = f"bench-floor-{secrets.token_hex(4)}"
        self.exchange = f"{self.prefix}.events"
        self.queue = f"{self.prefix}.all"
        self.client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
        self.database = database
        self.records = self.client[database]["documents"]
        self.fcm = Fcm(fcm_dir)
        self.work_dir = work_dir
        self.local = threading.local()
        self._channels: list[pika.BlockingConnection] = []
        self._lock = threading.Lock()
        conn = pika.BlockingConnection(self.params)
        chan = conn.channel()
        chan.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        chan.queue_declare(self.queue, durable=True)
        for key in (UPLOADED, STORED):
            chan.queue_bind(self.queue, self.exchange, routing_key=key)
        conn.close()

    def _channel(self) -> Any:
        chan = getattr(self.local, "chan", None)
        if chan is None:
            conn = pika.BlockingConnection(self.params)
            chan = conn.channel()
            chan.confirm_delivery()
            with self._lock:
                self._channels.append(conn)
            self.local.chan = chan
        return chan

    def _session(self) -> requests.Session:
        session = getattr(self.local, "session", None)
        if session is None:
            session = requests.Session()
            self.local.session = session
        return session

    def _publish(self, event_type: str, doc_id: str, payload: dict[str, Any]) -> None:
        props = pika.BasicProperties(content_type="application/json",
                                     delivery_mode=pika.DeliveryMode.Persistent,
                                     message_id=f"{doc_id}.{event_type.rsplit('.', 1)[-1]}")
        # With confirms on, basic_publish returns once the broker confirmed (raises on nack).
        self._channel().basic_publish(self.exchange, event_type, json.dumps(payload).encode(),
                                      props, mandatory=True)

    def one(self, source: Path, size: int, out_dir: Path) -> float:
        """One document through the floor; its latency in seconds."""
        started = time.perf_counter()
        doc_id = "floor" + secrets.token_hex(10)
        aead = AESGCM(AESGCM.generate_key(bit_length=256))
        prefix = os.urandom(7)
        index = 0
        pending = b""
        with source.open("rb") as src, (out_dir / doc_id).open("wb", buffering=MIB) as out:
            aad = doc_id.encode()
            for _ in range(size // READ + 2):  # bounded: the file has `size` bytes
                piece = src.read(READ)
                last = not piece
                data = memoryview(pending + piece if pending else piece)
                pos = 0
                # Hold the last chunk back until the next read tells whether it is final.
                while len(data) - pos > CHUNK or (last and pos < len(data)):
                    end = min(pos + CHUNK, len(data))
                    final = last and end == len(data)
                    nonce = prefix + struct.pack(">IB", index, 1 if final else 0)
                    out.write(aead.encrypt(nonce, data[pos:end], aad))
                    index += 1
                    pos = end
                pending = bytes(data[pos:])
                if last:
                    break
            out.flush()
            os.fsync(out.fileno())
            # Its pages go back, as the pipeline's storage gives a stored object's back.
            os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        now = datetime.now(UTC)
        self.records.insert_one({"_id": doc_id, "owner": "floor", "filename": "floor.pdf",
                                 "declared_type": "application/pdf", "size": size,
                                 "status": "processing", "created_at": now, "updated_at": now})
        self._publish(UPLOADED, doc_id, {"document_id": doc_id, "size": size})
        self.records.update_one({"_id": doc_id}, {"$set": {"status": "stored",
                                                            "updated_at": datetime.now(UTC)}})
        self._publish(STORED, doc_id, {"document_id": doc_id, "size": size})
        self.fcm.send(self._session(), doc_id)
        return time.perf_counter() - started

    def batch(self, source: Path, size: int, count: int, concurrency: int) -> dict[str, Any]:
        # Kept until run() ends (see the module's docstring).
        out_dir = self.work_dir / f"out-{secrets.token_hex(4)}"
        out_dir.mkdir(parents=True)
        cpu0 = _cpu()
        t0 = time.perf_counter()
        if concurrency <= 1:
            latencies = [self.one(source, size, out_dir) for _ in range(count)]
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                latencies = list(pool.map(lambda _i: self.one(source, size, out_dir),
                                          range(count)))
        wall = time.perf_counter() - t0
        cpu = _cpu() - cpu0
        return {
            "count": count,
            "concurrency": max(concurrency, 1),
            "seconds": wall,
            "docs_per_s": count / wall,
            "mib_per_s": count * size / MIB / wall,
            "latency_ms": latency_summary(latencies),
            "cpu_s_per_doc": cpu / count,
        }

    def close(self) -> None:
        for conn in self._channels:
            if conn.is_open:
                conn.close()
        conn = pika.BlockingConnection(self.params)
        chan = conn.channel()
        chan.queue_delete(self.queue)
        chan.exchange_delete(self.exchange)
        conn.close()
        self.client.drop_database(self.database)
        self.client.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(amqp_url: str, mongodb_uri: str, fcm_dir: Path, work_dir: Path,
        specs: list[SizeSpec]) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    floor = Floor(amqp_url, mongodb_uri, f"bench_floor_{secrets.token_hex(4)}", fcm_dir,
                  work_dir)
    results: dict[str, Any] = {}
    try:
        for spec in specs:
            source = work_dir / f"source-{spec.name}.pdf"
            with source.open("wb") as out:
                for part in documents.parts(documents.mark("floor", spec.name, 0), spec.size):
                    out.write(part)
            size = source.stat().st_size
            floor.one(source, size, work_dir)  # warm up connections and the token
            entry: dict[str, Any] = {"size": size}
            if spec.sequential:
                entry["sequential"] = floor.batch(source, size, spec.sequential, 1)
            if spec.concurrent:
                entry["concurrent"] = floor.batch(source, size, spec.concurrent,
                                                  spec.concurrency)
            results[spec.name] = entry
            print(f"floor {spec.name}: " + ", ".join(
                f"{k} {v['docs_per_s']:.1f} docs/s {v['mib_per_s']:.1f} MiB/s"
                for k, v in entry.items() if isinstance(v, dict)), flush=True)
    finally:
        floor.close()
        for leftover in work_dir.glob("floor*"):
            leftover.unlink(missing_ok=True)
        for written in [*work_dir.glob("out-*"), *work_dir.glob("source-*")]:
            if written.is_dir():
                shutil.rmtree(written, ignore_errors=True)
            else:
                written.unlink(missing_ok=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--mongodb-uri", required=True)
    parser.add_argument("--fcm-dir", type=Path, required=True,
                        help="directory of a running bench.fcm_server")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--spec", required=True, help="JSON list of size specs")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    specs = [SizeSpec(**item) for item in json.loads(args.spec)]
    result = run(args.amqp_url, args.mongodb_uri, args.fcm_dir, args.work_dir, specs)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
