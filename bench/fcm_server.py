"""The loopback FCM stub (tests/fcm_stub.py) in a process of its own, recording when each
push arrives.

Run by bench/run.py as ``python -m bench.fcm_server --dir DIR``: it writes
``DIR/service-account.json`` (token_uri pointing at the stub), ``DIR/base_url`` once it
listens, and appends one JSON line per accepted push to ``DIR/receipts.jsonl``::

    {"t": <time.time() at receipt>, "doc": "<data.document_id>", "status": "<data.status>"}

A process of its own keeps the stub's HTTP threads from competing for the load generator's
GIL (and its CPU is then measurable). Unlike the tests' stub it answers without Nagle's
delay (see ``_handler_without_nagle``). It stops on SIGTERM/SIGINT, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import tests.fcm_stub as fcm_stub_module
from tests.fcm_stub import FcmStub

_make_handler = fcm_stub_module._make_handler


def _handler_without_nagle(stub: FcmStub) -> type[BaseHTTPRequestHandler]:
    """The stub's handler with TCP_NODELAY on its sockets.

    The stub writes a response's headers and body in two writes; with Nagle's algorithm on,
    the body waits for the client's delayed ACK (40 ms on Linux) before it leaves, which
    would add 40 ms to every push, in the pipeline and the floor alike, that Google's front
    ends do not add.
    """
    handler = _make_handler(stub)
    handler.disable_nagle_algorithm = True
    return handler


# Only in this process (the benchmark's stub); FcmStub.start looks the factory up here.
fcm_stub_module._make_handler = _handler_without_nagle


class RecordingStub(FcmStub):
    """FcmStub that also appends every accepted push, with its arrival time, to a file."""

    def __init__(self, receipts: Path) -> None:
        super().__init__()
        self._out: TextIO = receipts.open("a", encoding="utf-8", buffering=1)
        self._out_lock = threading.Lock()

    def _send(
        self, project: str, auth: str | None, raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        arrived = time.time()
        status, payload, headers = super()._send(project, auth, raw)
        if status == 200:
            try:
                message = json.loads(raw).get("message", {})
            except ValueError:
                message = {}
            data = message.get("data") or {}
            line = json.dumps({"t": arrived, "doc": data.get("document_id", ""),
                               "status": data.get("status", "")})
            with self._out_lock:
                self._out.write(line + "\n")
        return status, payload, headers

    def close_log(self) -> None:
        with self._out_lock:
            self._out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=4 * 3600.0)
    args = parser.parse_args(argv)
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stub = RecordingStub(directory / "receipts.jsonl")
    stub.start()
    try:
        stub.write_service_account(directory / "service-account.json")
        (directory / "base_url").write_text(stub.base_url)
        stop.wait(args.max_seconds)
    finally:
        stub.stop()
        stub.close_log()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
