"""How the pipeline's per-document MongoDB operations scale with the collection size on the
SecantusDB server the project ships (and tests against).

    .venv/bin/python -m bench.query_scaling [--sizes 500,2500] [--retry-writes]

Starts its own ``secantusd-py`` on a free loopback port with a temporary storage directory,
creates the documents and deliveries collections with the project's own indexes
(``DocumentRepository.ensure_indexes``, ``DeliveryRepository.ensure_indexes``), fills them
with records shaped like the pipeline's, and times each per-document operation (the same
filter and update shapes as ``shared/documents.py`` and ``shared/deliveries.py``) at each
size, with the server's ``explain`` plan of the filter. An operation whose time grows with
the size is a collection scan: it makes every document slower as the installation grows.
Then it times the outbox marks (``published_many``) one at a time and in batches, for
records that still hold the event and for records storage already finished (moot marks).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection

from bench import procs
from shared.deliveries import DeliveryRepository
from shared.documents import STILL_PROCESSING, DocumentRepository, slot
from tests.services import MongoServer

BIN = Path(sys.executable).parent


def _plan(col: Collection[dict[str, Any]], flt: dict[str, Any]) -> str:
    explained = col.database.command("explain", {"find": col.name, "filter": flt, "limit": 1})
    stage = explained["queryPlanner"]["winningPlan"]
    names: list[str] = []
    for _ in range(8):  # bounded walk down the plan's stages
        names.append(str(stage.get("stage")) + (f"({stage['indexName']})"
                                                 if "indexName" in stage else ""))
        if "inputStage" not in stage:
            break
        stage = stage["inputStage"]
    return " <- ".join(names)


# name, collection, the filter of a read (None for a write), the call
Operation = tuple[str, Collection[dict[str, Any]], dict[str, Any] | None, Callable[[], object]]


def _operations(docs: Collection[dict[str, Any]], deliveries: Collection[dict[str, Any]],
                pending: str, now: datetime) -> list[Operation]:
    """The per-document operations, with the pipeline's current filter and update shapes
    (shared/documents.py, shared/deliveries.py: keep them in step)."""
    same = {"content_slot": slot("user1", "0" * 64)}
    keyed = {"idempotency_slot": slot("user1", "retry-of-nothing")}
    finish = {"_id": pending, "status": STILL_PROCESSING}
    outbox = {"outbox_due": {"$lte": now}}
    drained = {"_id": pending, "outbox_due": now}

    def claim() -> object:
        # The first claim of an outcome (nearly every one) is an insert.
        return deliveries.insert_one({
            "_id": f"{secrets.token_hex(16)}.stored", "document_id": pending, "owner": "user1",
            "state": "in_progress", "lease_until": now, "attempts": 1, "sent": [],
            "created_at": now, "updated_at": now})

    return [
        # Only after an upload's insert collided (a repeat), not per document.
        ("documents.live_with_content (a repeat)", docs, same,
         lambda: docs.find_one(same)),
        # Per upload that carries an Idempotency-Key (the benchmark's client sends none).
        ("documents.by_idempotency_key (upload)", docs, keyed,
         lambda: docs.find_one(keyed)),
        ("documents.get (storage)", docs, {"_id": pending},
         lambda: docs.find_one({"_id": pending})),
        ("documents.finish (storage)", docs, None,
         lambda: docs.update_one(finish, {"$set": {"updated_at": now, "outbox": []},
                                          "$unset": {"outbox_due": ""}})),
        ("documents.outbox_drained (relay)", docs, None,
         lambda: docs.update_one(drained, {"$unset": {"outbox_due": ""}})),
        ("documents.claim_outbox candidates (relay)", docs, outbox,
         lambda: list(docs.find(outbox).sort("outbox_due", 1).limit(20))),
        ("deliveries.claim (notification)", deliveries, None, claim),
    ]


def _marks(repo: DocumentRepository, server: MongoServer, now: datetime,
           count: int = 256) -> None:
    """Confirmed events' marks (``published_many``) one write each and batched, with the
    server's CPU per mark (shared/outbox_marks.py batches them), and batched marks that
    storage made moot (``finish`` emptied the outbox first, as it nearly always has)."""
    assert server.proc is not None
    for batch, moot in ((1, False), (16, False), (64, False), (16, True), (64, True)):
        marks = []
        for _ in range(count):
            doc_id, event_id = secrets.token_hex(16), secrets.token_hex(16)
            repo.col.insert_one({"_id": doc_id, "owner": "user1", "sha256": doc_id,
                                 "status": "processing", "created_at": now, "updated_at": now,
                                 "outbox": [] if moot else [{"id": event_id, "event": "x" * 600}],
                                 **({} if moot else {"outbox_due": now})})
            marks.append((doc_id, event_id))
        cpu = procs.cpu_times(server.proc.pid)
        started = time.perf_counter()
        for first in range(0, count, batch):
            repo.published_many(marks[first:first + batch])
        ms = (time.perf_counter() - started) / count * 1000
        after = procs.cpu_times(server.proc.pid)
        server_ms = (after.total - cpu.total) / count * 1000 if cpu and after else float("nan")
        kind = "moot (record finished)" if moot else "written"
        print(f"  {ms:8.2f} ms  outbox marks, {batch:2} a write, {kind:22} per mark"
              f" server CPU {server_ms:.2f} ms", flush=True)


def run(sizes: list[int], retry_writes: bool, repeat: int) -> None:
    storage = Path(tempfile.mkdtemp(prefix="docproc-query-scaling-"))
    server = MongoServer(storage / "db")
    server.start()
    try:
        options = "" if retry_writes else "?retryWrites=false"
        client: MongoClient[dict[str, Any]] = MongoClient(f"{server.uri}{options}")
        db = client["query_scaling"]
        DocumentRepository(db).ensure_indexes()
        DeliveryRepository(db).ensure_indexes()
        docs, deliveries = db["documents"], db["deliveries"]
        now = datetime.now(UTC)
        filled = 0
        for size in sorted(sizes):
            fill_started = time.perf_counter()
            for i in range(filled, size):
                doc_id, digest = secrets.token_hex(16), secrets.token_hex(32)
                docs.insert_one({
                    "_id": doc_id, "owner": f"user{i % 8}", "sha256": digest,
                    "content_slot": slot(f"user{i % 8}", digest), "idempotency_key": doc_id,
                    "idempotency_slot": slot(f"user{i % 8}", doc_id), "status": "stored",
                    "created_at": now, "updated_at": now,
                    "filename": "doc.pdf", "filename_folded": "doc.pdf",
                    "declared_type": "application/pdf", "media_type": "application/pdf",
                    "size": 65536, "upload_event_id": secrets.token_hex(16), "outbox": [],
                    "wrapped_key": {"provider": "local", "key_id": "k", "blob": b"k" * 60},
                    "metadata": {"pages": 1}})
                deliveries.insert_one({
                    "_id": f"{doc_id}.stored", "document_id": doc_id, "owner": f"user{i % 8}",
                    "state": "completed", "lease_until": None, "attempts": 1,
                    "sent": [{"token": "t", "message_id": "m"}]})
            writes = 2 * (size - filled)
            fill_ms = (time.perf_counter() - fill_started) * 1000 / max(writes, 1)
            filled = size
            pending = secrets.token_hex(16)
            docs.insert_one({"_id": pending, "owner": "user1", "sha256": "p",
                             "status": "processing", "created_at": now, "updated_at": now,
                             "filename_folded": "p"})
            ops = _operations(docs, deliveries, pending, now)
            print(f"\n{size} documents and {size} deliveries "
                  f"(retryWrites={'on' if retry_writes else 'off'}; filling took "
                  f"{fill_ms:.2f} ms per insert):")
            for name, col, flt, op in ops:
                cpu = procs.cpu_times(server.proc.pid) if server.proc else None
                started = time.perf_counter()
                for _ in range(repeat):
                    op()
                ms = (time.perf_counter() - started) / repeat * 1000
                after = procs.cpu_times(server.proc.pid) if server.proc else None
                server_ms = ((after.total - cpu.total) / repeat * 1000 if cpu and after
                             else float("nan"))
                # SecantusDB's explain of a write shows a COLLSCAN whatever the write does;
                # a write's time across the sizes is what tells a point lookup from a scan.
                plan = _plan(col, flt) if flt is not None else "(a write: compare the sizes)"
                print(f"  {ms:8.2f} ms  {name:42} server CPU {server_ms:5.2f} ms  plan: {plan}",
                      flush=True)
            _marks(DocumentRepository(db), server, now)
        client.close()
    finally:
        server.stop()
        shutil.rmtree(storage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,2500",
                        help="collection sizes to measure at (default 500,2500; max 20000)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per operation")
    parser.add_argument("--retry-writes", action="store_true",
                        help="leave pymongo's retryable writes on")
    args = parser.parse_args(argv)
    sizes = [min(int(s), 20_000) for s in args.sizes.split(",") if s.strip()]
    run(sizes, args.retry_writes, max(1, min(args.repeat, 1000)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
