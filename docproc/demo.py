"""``docproc demo``: start ``docproc serve`` and walk one document through the pipeline.

Upload (as a driver, through the HTTP contract Kong would forward), processing, storage,
the push notification and the download through the signed link, printed step by step.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import requests
from pypdf import PdfWriter

from shared.config import load_settings
from shared.mongo import require_own_embedded

DRIVER = {"X-Consumer-Username": "demo-driver", "X-Consumer-Groups": "drivers"}


def sample_pdf() -> bytes:
    writer = PdfWriter()
    for _ in range(2):
        writer.add_blank_page(width=595, height=842)
    # A fresh id each run: the same bytes again would be answered with the first document.
    writer.add_metadata({"/Title": "Proof of delivery #1042", "/Subject": uuid.uuid4().hex})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docproc serve exited with {proc.returncode}")
        try:
            if requests.get(f"{base}/healthz", timeout=1).ok:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or still starting up on a busy machine
        time.sleep(0.2)
    raise RuntimeError("docproc serve did not become ready")


def _step(text: str, payload: Any = None) -> None:
    print(f"\n==> {text}")
    if payload is not None:
        print(json.dumps(payload, indent=2, default=str))


def run_demo(keep_running: bool = False) -> int:
    settings = load_settings()
    require_own_embedded(settings)  # the demo's server would share another one's database
    port = _free_port(settings.port)
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DOCPROC_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "docproc.cli", "serve", "--port", str(port)],
                            env=env)
    try:
        _wait_ready(base, proc)
        _step(f"docproc serve is up on {base} (data in {settings.data_dir.resolve()})")
        resp = requests.post(f"{base}/v1/users/me/devices", headers=DRIVER, timeout=10,
                             json={"token": "demo-device-token", "platform": "android"})
        _step(f"driver registers a phone for push notifications: HTTP {resp.status_code}",
              resp.json())
        body = sample_pdf()
        resp = requests.post(f"{base}/v1/documents", data=body, timeout=30, headers={
            **DRIVER, "Content-Type": "application/pdf", "X-Filename": "proof-of-delivery.pdf"})
        resp.raise_for_status()
        doc_id = resp.json()["id"]
        _step(f"driver uploads a {len(body)}-byte PDF: HTTP {resp.status_code}, "
              f"Location {resp.headers['Location']}", resp.json())
        status: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = requests.get(f"{base}/v1/documents/{doc_id}", headers=DRIVER,
                                  timeout=10).json()
            if status.get("status") != "processing":
                break
            time.sleep(0.1)
        _step("the storage function verified, inspected and stored it", status)
        if status.get("status") != "stored":
            return 1
        got = requests.get(status["download_url"], headers=DRIVER, timeout=30)
        same = hashlib.sha256(got.content).hexdigest() == hashlib.sha256(body).hexdigest()
        _step(f"download through the signed link: HTTP {got.status_code}, "
              f"{len(got.content)} bytes, {got.headers.get('Content-Type')}, "
              f"byte-identical: {same}")
        outbox = settings.outbox_path
        if settings.firebase_credentials is None:
            for _ in range(50):
                lines = [json.loads(line) for line in outbox.read_text().splitlines()
                         ] if outbox.exists() else []
                mine = [n for n in lines if n.get("data", {}).get("document_id") == doc_id]
                if mine:
                    _step(f"push notification (FCM outbox, {outbox})", mine[-1])
                    break
                time.sleep(0.1)
        else:
            _step("push notification sent through Firebase Cloud Messaging")
        print("\nThe document is encrypted at rest under", settings.efs_root.resolve())
        if keep_running:
            print(f"docproc serve keeps running on {base}; Ctrl-C stops it")
            proc.wait()
        return 0 if same else 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
