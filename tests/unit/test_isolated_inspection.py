"""Large PDFs and TIFFs are inspected by another process under a memory budget and a
deadline: what the parsers' own limits let through (memory and time that grow with the
file) ends as a rejection there, and the function's process stays as it was."""

from __future__ import annotations

import io
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.envelope import EnvelopeWriter
from shared.inspection import InvalidDocument, extract_metadata
from shared.inspection.isolated import (
    INSPECT_IN_PROCESS,
    InspectionCrashed,
    inspect_isolated,
    needs_isolation,
    stop_inspectors,
)
from tests import hostile_samples as hostile
from tests import samples

MIB = 1024 * 1024
PDF = "application/pdf"
TIFF = "image/tiff"
AAD = b"doc-1"


def _sealed(tmp_path: Path, data: bytes) -> tuple[Path, bytes]:
    key = secrets.token_bytes(32)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "object"
    with path.open("wb") as sink:
        writer = EnvelopeWriter(key, sink, associated_data=AAD)
        writer.write(data)
        writer.close()
    return path, key


def _inspect(tmp_path: Path, media_type: str, data: bytes, *, memory: int = 256 * MIB,
             seconds: float = 60) -> dict[str, Any]:
    path, key = _sealed(tmp_path, data)
    return inspect_isolated(media_type, path, key, AAD, memory_bytes=memory, seconds=seconds)


@pytest.fixture(autouse=True)
def _fresh_inspectors() -> Iterator[None]:
    stop_inspectors()
    yield
    stop_inspectors()


def _inspectors() -> list[int]:
    return [p.pid for p in multiprocessing.active_children()
            if p.name == "docproc-inspect" and p.pid is not None]


def test_only_large_pdfs_and_tiffs_leave_the_process() -> None:
    assert needs_isolation(PDF, INSPECT_IN_PROCESS + 1)
    assert needs_isolation(TIFF, INSPECT_IN_PROCESS + 1)
    assert not needs_isolation(PDF, INSPECT_IN_PROCESS)
    assert not needs_isolation("image/jpeg", 100 * MIB)  # walked in blocks, memory flat


@pytest.mark.parametrize(("media_type", "data"), [
    (PDF, samples.pdf(b"pod", pages=3, padding=2 * MIB)),
    (TIFF, hostile.tiff(pages=2, size=(1024, 1024))),
], ids=["pdf", "tiff"])
def test_a_large_document_gets_the_metadata_it_gets_in_process(
    tmp_path: Path, media_type: str, data: bytes,
) -> None:
    assert len(data) > INSPECT_IN_PROCESS
    expected = extract_metadata(media_type, io.BytesIO(data))
    assert _inspect(tmp_path / "a", media_type, data) == expected
    [inspector] = _inspectors()
    assert _inspect(tmp_path / "b", media_type, data) == expected
    assert _inspectors() == [inspector]  # the same inspector took the next document


@pytest.mark.parametrize(("media_type", "data"), [
    # In process these were accepted: the PDF held some 100 MiB while pypdf opened it, the
    # TIFF some 300 MiB (2 MB and 4 MB files; both grow with the file).
    (PDF, hostile.pdf_nested_arrays(1000, 1000)),
    (TIFF, hostile.tiff_long_tag(1_000_000)),
], ids=["pdf-nested-arrays", "tiff-long-tag"])
def test_a_document_needing_more_memory_than_allowed_is_rejected(
    tmp_path: Path, media_type: str, data: bytes,
) -> None:
    with pytest.raises(InvalidDocument, match=r"needs more than 64 MiB of memory"):
        _inspect(tmp_path / "a", media_type, data, memory=64 * MIB)
    assert _inspectors() == []  # killed
    fine = samples.pdf(b"pod", padding=2 * MIB)
    assert _inspect(tmp_path / "b", PDF, fine)["pages"] == 1  # by a new one


def test_a_document_inspected_past_the_deadline_is_rejected_and_its_child_killed(
    tmp_path: Path,
) -> None:
    data = hostile.pdf_nested_arrays(1000, 1000)  # seconds of parsing
    started = time.monotonic()
    with pytest.raises(InvalidDocument, match=r"longer than 0\.3 s to inspect"):
        _inspect(tmp_path, PDF, data, memory=1024 * MIB, seconds=0.3)
    assert time.monotonic() - started < 3
    assert _inspectors() == []  # killed


def test_an_inspector_killed_from_outside_is_an_error_to_retry_not_a_verdict(
    tmp_path: Path,
) -> None:
    path, key = _sealed(tmp_path, hostile.pdf_nested_arrays(1000, 1000))  # seconds of work
    killed: list[int] = []

    def kill_the_inspector() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pids := _inspectors():
                time.sleep(0.5)  # at work by now
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_inspector)
    killer.start()
    try:
        with pytest.raises(InspectionCrashed, match="exit code -9"):
            inspect_isolated(PDF, path, key, AAD, memory_bytes=1024 * MIB, seconds=60)
    finally:
        killer.join()
    assert killed
    assert _inspectors() == []


def test_a_tampered_object_is_an_error_to_retry(tmp_path: Path) -> None:
    path, key = _sealed(tmp_path, samples.pdf(b"pod", padding=2 * MIB))
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="EnvelopeError"):
        inspect_isolated(PDF, path, key, AAD, memory_bytes=256 * MIB, seconds=60)


ORPHAN_SCRIPT = """
import multiprocessing, secrets, sys, threading, time
from pathlib import Path
from shared.envelope import EnvelopeWriter
from shared.inspection.isolated import inspect_isolated
from tests import hostile_samples

def report():
    while True:
        for child in multiprocessing.active_children():
            if child.name == "docproc-inspect":
                time.sleep(0.3)  # at work by now
                print(child.pid, flush=True)
                return
        time.sleep(0.01)

if __name__ == "__main__":
    key = secrets.token_bytes(32)
    path = Path(sys.argv[1])
    with path.open("wb") as sink:
        writer = EnvelopeWriter(key, sink, associated_data=b"doc-1")
        writer.write(hostile_samples.pdf_nested_arrays(2000, 2000))
        writer.close()
    threading.Thread(target=report, daemon=True).start()
    inspect_isolated("application/pdf", path, key, b"doc-1", memory_bytes=2048 << 20,
                     seconds=600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_an_inspector_stops_when_the_function_process_is_killed(tmp_path: Path) -> None:
    """Killed mid-document (a gunicorn worker SIGKILLed, say), the function process left
    an inspector parsing on, unwatched, beside its replacement's inspectors."""
    script = tmp_path / "function.py"
    script.write_text(ORPHAN_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    function = subprocess.Popen([sys.executable, str(script), str(tmp_path / "object")],
                                stdout=subprocess.PIPE, cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert function.stdout is not None
        inspector = int(function.stdout.readline())
        assert _running(inspector)
        function.kill()
        function.wait()
        deadline = time.monotonic() + 10
        while _running(inspector) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(inspector)
    finally:
        if function.poll() is None:
            function.kill()
            function.wait()
