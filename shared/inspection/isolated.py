"""Inspecting a large PDF or TIFF in a child process, under a memory budget and a deadline.

The parsers' own limits bound most hostile files, but not all: pypdf caps each array, not
how many there are (a 4 MB PDF of arrays held 200 MiB while it opened), and Pillow reads a
TIFF tag's values whatever their number (a 16 MB file declaring four million held 1.2 GiB,
and was stored). Memory and time grow with the file's size, so documents up to
``INSPECT_IN_PROCESS`` are inspected in the function's own process (the worst of them
costs tens of MiB), and larger ones in a child: one that grows past its memory budget or
its deadline is killed and its document rejected. Small documents, nearly all of them,
pay nothing for this; a large one pays some 20 ms.

Children are forked from a ``forkserver`` that has the parsers imported already: forking
the function's own process is unsafe (it runs threads) and starting Python afresh costs a
quarter of a second. At most ``MAX_CHILDREN`` run at once per process, so that the pod's
memory limit holds them (knative/base/functions/storage.yaml: 768 MiB, with the function
itself under 150 MiB and two children of 256 MiB each).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import resource
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shared.blobstore import release_pages
from shared.envelope import EnvelopeReader
from shared.inspection.errors import InvalidDocument
from shared.inspection.extract import extract_metadata

INSPECT_IN_PROCESS = 1024 * 1024
ISOLATED_TYPES = frozenset({"application/pdf", "image/tiff"})
MAX_CHILDREN = 2
MIB = 1024 * 1024
# How often the parent looks at the child's memory: a parser allocating a GiB a second
# overshoots the budget by some 20 MiB before it is killed.
_WATCH_INTERVAL = 0.02

_slots = threading.BoundedSemaphore(MAX_CHILDREN)
_context_lock = threading.Lock()
_context: Any = None


class InspectionCrashed(Exception):
    """The child ended without an answer (killed from outside, say): not the document's
    fault as far as anyone can tell, so the event is retried rather than the document
    rejected."""


def needs_isolation(media_type: str, size: int) -> bool:
    return media_type in ISOLATED_TYPES and size > INSPECT_IN_PROCESS


def inspect_isolated(media_type: str, path: Path, data_key: bytes, associated_data: bytes,
                     *, memory_bytes: int, seconds: float) -> dict[str, Any]:
    """``extract_metadata`` of the envelope at ``path``, run in a child process whose
    resident memory may grow by ``memory_bytes`` and which must answer within ``seconds``."""
    ctx = _forkserver()
    with _slots:
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_inspect_in_child, name="docproc-inspect", daemon=True,
                            args=(send, media_type, str(path), data_key, associated_data,
                                  memory_bytes))
        child.start()
        send.close()  # the child's end: EOF here once the child is gone
        try:
            outcome, value = _watch(child, receive, memory_bytes, seconds)
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            receive.close()
    if outcome == "ok":
        metadata: dict[str, Any] = value
        return metadata
    if outcome == "invalid":
        raise InvalidDocument(value)
    if outcome == "error":
        raise RuntimeError(f"inspection failed: {value}")
    raise InspectionCrashed(f"inspection process ended with exit code {child.exitcode}")


def _watch(child: Any, receive: Connection, memory_bytes: int,
           seconds: float) -> tuple[str, Any]:
    """The child's answer, watching its resident memory meanwhile. Watched from here rather
    than capped in the child: a Python process whose allocations fail (``RLIMIT_AS``) can
    spend minutes failing in C before the ``MemoryError`` surfaces (Pillow reading a long
    TIFF tag did), where a process over its budget here is simply killed."""
    deadline = time.monotonic() + seconds
    limit: int | None = None
    while True:
        if receive.poll(_WATCH_INTERVAL):
            try:
                message: tuple[str, Any] = receive.recv()
            except EOFError:
                return "crashed", None
            if message[0] == "ready":
                limit = message[1] + memory_bytes
                continue
            return message
        if time.monotonic() > deadline:
            child.kill()
            raise InvalidDocument(f"document takes longer than {seconds:g} s to inspect")
        if limit is not None and (_resident(child.pid) or 0) > limit:
            child.kill()
            raise InvalidDocument(
                f"document needs more than {memory_bytes // MIB} MiB of memory to inspect")


def _forkserver() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            # "__main__" too: each child would import it again otherwise (the command's module).
            ctx.set_forkserver_preload(["__main__", "shared.inspection.isolated"])
            _context = ctx
        return _context


def _inspect_in_child(conn: Connection, media_type: str, path: str, data_key: bytes,
                      associated_data: bytes, memory_bytes: int) -> None:
    try:
        # A backstop should watching fail (the parent stopped): address space is looser
        # than resident memory (allocators reserve more than they touch), so 4 times.
        _cap_address_space(4 * memory_bytes)
        conn.send(("ready", _resident(os.getpid())))
        with open(path, "rb") as source:
            plain = io.BufferedReader(EnvelopeReader(data_key, source,
                                                     associated_data=associated_data))
            answer: tuple[str, Any] = ("ok", extract_metadata(media_type, plain))
            release_pages(source)  # as storage does after its last read of a new object
    except InvalidDocument as exc:
        answer = ("invalid", str(exc))
    except MemoryError:
        # Raised outside the parsers' own handlers (while opening, say): the same verdict.
        answer = ("invalid", f"document needs more than {memory_bytes // MIB} MiB to inspect")
    except Exception as exc:  # the envelope failed its check, the file went away: retried
        answer = ("error", f"{type(exc).__name__}: {exc}")
    conn.send(answer)
    conn.close()


def _resident(pid: int | None) -> int | None:
    """Resident memory in bytes (statm's second field), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return None


def _cap_address_space(extra: int) -> None:
    """Allow the child what it maps now (the interpreter and the parsers) plus ``extra``.
    Without /proc (not Linux) the deadline is the only bound."""
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, mapped + extra))
    except (OSError, ValueError):
        return
