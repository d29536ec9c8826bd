"""Inspecting a large PDF or TIFF in another process, under a memory budget and a deadline.

The parsers' own limits bound most hostile files, but not all: pypdf caps each array, not
how many there are (a 4 MB PDF of arrays held 200 MiB while it opened), and Pillow reads a
TIFF tag's values whatever their number (a 16 MB file declaring four million held 1.2 GiB,
and was stored). Memory and time grow with the file's size, so documents up to
``INSPECT_IN_PROCESS`` are inspected in the function's own process (the worst of them
costs tens of MiB), and larger ones by an inspector process: one that grows past its
memory budget or its deadline is killed and the document rejected. Small documents,
nearly all of them, pay nothing for this.

Inspectors are long-lived, one document at a time each, at most ``MAX_INSPECTORS`` per
process, so that the pod's memory limit holds them all (knative/base/functions/storage.yaml:
768 MiB). The function stays under 150 MiB, the forkserver takes some 40 MiB and
multiprocessing's resource tracker 13; an inspector starts at 30-57 MiB resident, most of
it pages it shares with the forkserver, and may grow by the budget (192 MiB by default)
plus what it allocates in the 20 ms between two looks: 150 + 40 + 13 + 2 x (10 + 192 +
20) MiB is about 650. A process per document cost 0.3-0.4 s of waiting each under load:
starting one takes the parent a dozen round trips, each waiting for the GIL its busy
threads hold. They are forked from a ``forkserver`` with the parsers imported (forking the
function's own process is unsafe: it runs threads), one that grew while inspecting is
replaced, and one whose function process is gone stops.

Known limit: a process forked after it used an inspector (gunicorn's master never does)
cannot start inspectors of its own: multiprocessing's forkserver belongs to the parent.
"""


from __future__ import annotations

import io
import multiprocessing
import os
import resource
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shared.blobstore import release_pages
from shared.envelope import EnvelopeReader
from shared.inspection.errors import InvalidDocument
from shared.inspection.extract import extract_metadata

INSPECT_IN_PROCESS = 1024 * 1024
ISOLATED_TYPES = frozenset({"application/pdf", "image/tiff"})
MAX_INSPECTORS = 2
MIB = 1024 * 1024
# How often the parent looks at an inspector's memory: a parser allocating a GiB a second
# overshoots the budget by some 20 MiB before it is killed.
_WATCH_INTERVAL = 0.02
# An inspector that holds this much more than when it started (what pypdf and Pillow left
# behind, fragmented) is replaced rather than given the next document.
_RETIRE_GROWTH = 32 * MIB
# An inspector is ready in a fraction of a second; one that is not after this is killed.
_START_TIMEOUT = 30.0


class InspectionCrashed(Exception):
    """The inspector ended without an answer (killed from outside, say): not the
    document's fault as far as anyone can tell, so the event is retried rather than the
    document rejected."""


def needs_isolation(media_type: str, size: int) -> bool:
    return media_type in ISOLATED_TYPES and size > INSPECT_IN_PROCESS


@dataclass
class _Inspector:
    process: Any
    conn: Connection
    baseline: int
    lifeline: Connection

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()
        self.lifeline.close()


class _Inspectors:
    """This process's inspectors: idle ones wait here, busy ones are with a caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_INSPECTORS)
        self._idle: list[_Inspector] = []
        self._context: Any = None

    def inspect(self, media_type: str, path: Path, data_key: bytes, associated_data: bytes,
                memory_bytes: int, seconds: float) -> tuple[str, Any]:
        with self._slots:
            inspector = self._take()
            keep = False
            try:
                # The budget counts from what the inspector holds now: what an earlier
                # document left it (up to _RETIRE_GROWTH) must not shrink this one's.
                before = _resident(inspector.process.pid) or inspector.baseline
                inspector.conn.send((media_type, str(path), data_key, associated_data))
                outcome, value = _watch(inspector, before + memory_bytes, memory_bytes,
                                        seconds)
                now = _resident(inspector.process.pid) or 0
                keep = outcome in ("ok", "invalid") and now < inspector.baseline + _RETIRE_GROWTH
                return outcome, value
            finally:
                if keep:
                    with self._lock:
                        self._idle.append(inspector)
                else:
                    inspector.stop()

    def _take(self) -> _Inspector:
        with self._lock:
            while self._idle:
                inspector = self._idle.pop()
                if inspector.process.is_alive():
                    return inspector
                inspector.stop()
            if self._context is None:
                ctx = multiprocessing.get_context("forkserver")
                # "__main__" too: each inspector would import it again otherwise.
                ctx.set_forkserver_preload(["__main__", "shared.inspection.isolated"])
                self._context = ctx
            ctx = self._context
        ours, theirs = ctx.Pipe(duplex=True)
        # Held here only: the inspector sees EOF on its end the moment this process is
        # gone, and stops even in the middle of a document nobody watches any more.
        lifeline_in, lifeline = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_serve, name="docproc-inspect", daemon=True,
                              args=(theirs, lifeline_in))
        process.start()
        theirs.close()  # EOF on ours once the inspector is gone
        lifeline_in.close()
        try:
            if not ours.poll(_START_TIMEOUT):
                process.kill()
                raise EOFError
            _ready, baseline = ours.recv()
        except EOFError:
            process.join()
            ours.close()
            lifeline.close()
            raise InspectionCrashed(
                f"inspection process ended with exit code {process.exitcode} before it "
                "was ready") from None
        return _Inspector(process, ours, baseline, lifeline)

    def stop(self) -> None:
        """Stop the idle inspectors (tests; a process that exits has them killed anyway)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for inspector in idle:
            inspector.stop()


_inspectors = _Inspectors()


def inspect_isolated(media_type: str, path: Path, data_key: bytes, associated_data: bytes,
                     *, memory_bytes: int, seconds: float) -> dict[str, Any]:
    """``extract_metadata`` of the envelope at ``path``, run by an inspector process whose
    resident memory may grow by ``memory_bytes`` and which must answer within ``seconds``."""
    outcome, value = _inspectors.inspect(media_type, path, data_key, associated_data,
                                         memory_bytes, seconds)
    if outcome == "ok":
        metadata: dict[str, Any] = value
        return metadata
    if outcome == "invalid":
        raise InvalidDocument(value)
    if outcome == "error":
        raise RuntimeError(f"inspection failed: {value}")
    raise InspectionCrashed(f"inspection process ended with exit code {value}")


def stop_inspectors() -> None:
    _inspectors.stop()


def _watch(inspector: _Inspector, limit: int, memory_bytes: int,
           seconds: float) -> tuple[str, Any]:
    """The inspector's answer, watching its resident memory meanwhile. Watched from here
    rather than capped in the inspector: a Python process whose allocations fail
    (``RLIMIT_AS``) can spend minutes failing in C before the ``MemoryError`` surfaces
    (Pillow reading a long TIFF tag did), where one over its budget here is simply
    killed."""
    deadline = time.monotonic() + seconds
    process = inspector.process
    while True:
        if inspector.conn.poll(_WATCH_INTERVAL):
            try:
                answer: tuple[str, Any] = inspector.conn.recv()
            except EOFError:
                process.join()
                return "crashed", process.exitcode
            return answer
        if time.monotonic() > deadline:
            process.kill()
            raise InvalidDocument(f"document takes longer than {seconds:g} s to inspect")
        if (_resident(process.pid) or 0) > limit:
            process.kill()
            raise InvalidDocument(
                f"document needs more than {memory_bytes // MIB} MiB of memory to inspect")


def _serve(conn: Connection, lifeline: Connection) -> None:
    """An inspector: one document at a time, for as long as its parent wants it."""
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()
    conn.send(("ready", _resident(os.getpid()) or 0))
    while True:
        try:
            media_type, path, data_key, associated_data = conn.recv()
        except EOFError:
            return
        conn.send(_inspect(media_type, path, data_key, associated_data))


def _exit_with_parent(lifeline: Connection) -> None:
    # Nothing is ever sent: poll returns when the function process's end closes.
    lifeline.poll(None)
    os._exit(1)


def _inspect(media_type: str, path: str, data_key: bytes,
             associated_data: bytes) -> tuple[str, Any]:
    try:
        with open(path, "rb") as source:
            plain = io.BufferedReader(EnvelopeReader(data_key, source,
                                                     associated_data=associated_data))
            metadata = extract_metadata(media_type, plain)
            release_pages(source)  # as storage does after its last read of a new object
        return "ok", metadata
    except InvalidDocument as exc:
        return "invalid", str(exc)
    except Exception as exc:  # the envelope failed its check, the file went away: retried
        return "error", f"{type(exc).__name__}: {exc}"


def _resident(pid: int | None) -> int | None:
    """Resident memory in bytes (statm's second field), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return None
