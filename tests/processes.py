"""Starting docproc's programs as real processes, and reading their memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import requests

from shared.config import Settings
from tests.services import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in another process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCPROC_", "AMQP_",
                                                                       "MONGODB_", "REDIS_"))}
    pairs = {
        "AMQP_URL": settings.amqp_url,
        "MONGODB_URI": settings.mongodb_uri,
        "MONGODB_DATABASE": settings.mongodb_database,
        "REDIS_URL": settings.redis_url,
        "DOCPROC_AMQP_PREFIX": settings.amqp_prefix,
        "DOCPROC_REDIS_PREFIX": settings.redis_prefix,
        "DOCPROC_DATA_DIR": str(settings.data_dir),
        "FIREBASE_CREDENTIALS": str(settings.firebase_credentials or ""),
        "FCM_ENDPOINT": settings.fcm_endpoint,
        "DOCPROC_RETRY_DELAYS": ",".join(str(d) for d in settings.retry_delays),
        "DOCPROC_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
        "DOCPROC_OUTBOX_GRACE_SECONDS": str(settings.outbox_grace_seconds),
        "DOCPROC_OUTBOX_MARK_LINGER_SECONDS": str(settings.outbox_mark_linger_seconds),
        "DOCPROC_RELAY_INTERVAL_SECONDS": str(settings.relay_interval_seconds),
        "DOCPROC_PUBLIC_URL": settings.public_url_override,
        "KMS_KEY_ID": settings.kms_key_id,
    }
    env.update({k: v for k, v in pairs.items() if v})
    return env


@contextmanager
def process(args: list[str], env: Mapping[str, str], ready_url: str | None = None,
            log: Path | None = None, timeout: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env=dict(env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        if ready_url:
            _wait_http(proc, ready_url, timeout, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def _wait_http(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}\n{text}")
        try:
            requests.get(url, timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):
            # Not listening yet, or listening but still starting (a restart that recovers
            # its database on a busy machine can take longer than one try): look again.
            time.sleep(0.1)
    raise RuntimeError(f"{proc.args!r} did not answer on {url}")


def functions_framework(name: str, target: str, signature: str, env: Mapping[str, str],
                        log: Path) -> tuple[str, AbstractContextManager[subprocess.Popen[bytes]]]:
    port = free_port()
    args = [str(BIN / "functions-framework"), "--source", f"functions/{name}/main.py",
            "--target", target, "--signature-type", signature, "--host", "127.0.0.1",
            "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    return base, process(args, {**env, "PORT": str(port)}, ready_url=base + "/healthz", log=log)


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []
