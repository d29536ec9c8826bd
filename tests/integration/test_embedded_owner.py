"""The embedded database belongs to the `docproc serve` that started it: commands run beside
it (dlq, reprocess, backup) may use it, but a second pipeline on it is refused, since both
buses would take the same events and it goes when its owner stops."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pymongo
import pytest

from docproc.pipeline import Pipeline
from shared.config import ConfigError, Settings
from shared.mongo import EMBEDDED_URI_FILE
from tests.processes import BIN, process
from tests.services import free_port


def _embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOCPROC_", "AMQP_", "MONGODB_", "REDIS_", "FIREBASE_", "K_"))}
    env["DOCPROC_DATA_DIR"] = str(data_dir)
    return env


def test_a_second_pipeline_on_a_served_embedded_database_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _embedded_env(data_dir)
    port = free_port()
    with process([str(BIN / "docproc"), "serve", "--port", str(port)], env,
                 ready_url=f"http://127.0.0.1:{port}/healthz", log=tmp_path / "serve.log"):
        for argv in (["serve", "--port", str(free_port())], ["demo"]):
            second = subprocess.run([str(BIN / "docproc"), *argv], env=env, timeout=120,
                                    capture_output=True, text=True)
            assert second.returncode == 2, (argv, second.stderr)
            assert "another docproc process serves the embedded database" in second.stderr
            assert str(data_dir.resolve()) in second.stderr
        with pytest.raises(ConfigError, match="DOCPROC_DATA_DIR"):
            Pipeline(Settings(data_dir=data_dir))
        # A command beside it is welcome: it reads the same database. It leaves the indexes
        # of an older version alone: the server may be one, and they are its uniqueness.
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            (data_dir / EMBEDDED_URI_FILE).read_text().strip())
        try:
            documents = client["docproc"]["documents"]
            documents.create_index([("owner", 1), ("idempotency_key", 1)],
                                   name="owner_idempotency_key")
            listing = subprocess.run([str(BIN / "docproc"), "dlq", "list", "storage"],
                                     env=env, timeout=120, capture_output=True, text=True)
            assert listing.returncode == 0, listing.stderr
            assert "owner_idempotency_key" in documents.index_information()
        finally:
            client.close()
