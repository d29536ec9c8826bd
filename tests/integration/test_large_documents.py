"""A 200 MiB document goes up and comes back down through `docproc serve` while every
process of the server stays under 150 MiB of resident memory: uploads and downloads stream."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests import samples
from tests.helpers import DRIVER, settled
from tests.processes import BIN, children, peak_rss_bytes, process
from tests.services import free_port

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
SIZE = 200 * MIB
RSS_LIMIT = 150 * MIB


class _Body:
    """A request body made on the fly, with a length so it is sent with Content-Length."""

    def __init__(self, parts: Iterator[bytes], size: int) -> None:
        self.parts = parts
        self.size = size
        self.buffer = b""
        self.digest = hashlib.sha256()

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        while len(self.buffer) < n:
            part = next(self.parts, b"")
            if not part:
                break
            self.buffer += part
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        self.digest.update(out)
        return out


def test_200_mib_upload_and_download_keep_memory_flat(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOCPROC_", "AMQP_", "MONGODB_", "REDIS_", "FIREBASE_"))}
    env.update({"DOCPROC_DATA_DIR": str(tmp_path / "data"),
                "DOCPROC_MAX_UPLOAD_BYTES": str(SIZE + MIB)})
    padding = SIZE - samples.pdf_size()
    size = samples.pdf_size(padding=padding)
    with process([str(BIN / "docproc"), "serve", "--port", str(port)], env,
                 ready_url=base + "/healthz", log=tmp_path / "serve.log") as server:
        body = _Body(samples.pdf_parts(padding=padding), size)
        resp = requests.post(f"{base}/v1/documents", data=body, timeout=300,
                             headers={**DRIVER, "Content-Type": "application/pdf"})
        assert resp.status_code == 202, resp.text
        doc = settled(requests.Session(), base, resp.json()["id"], timeout=300)
        assert doc["status"] == "stored", doc
        assert doc["size"] == size
        assert doc["sha256"] == body.digest.hexdigest()

        digest = hashlib.sha256()
        received = 0
        with requests.get(doc["download_url"], headers=DRIVER, stream=True, timeout=300) as got:
            assert got.status_code == 200
            assert int(got.headers["Content-Length"]) == size
            for piece in got.iter_content(MIB):
                digest.update(piece)
                received += len(piece)
        assert received == size
        assert digest.hexdigest() == body.digest.hexdigest()

        peaks = {pid: peak_rss_bytes(pid) for pid in [server.pid, *children(server.pid)]}
        assert len(peaks) >= 2  # the gunicorn arbiter and its worker
        for pid, peak in peaks.items():
            assert peak < RSS_LIMIT, f"process {pid} peaked at {peak / MIB:.0f} MiB"
        print("peak RSS (MiB):", {pid: round(p / MIB, 1) for pid, p in peaks.items()})
