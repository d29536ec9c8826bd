"""What dropping a stored object's pages saves the next upload (bench/README.md, Findings 28).

    .venv/bin/python -m bench.page_cache [--size-mib 200] [--objects 6] [--rounds 3]

Writes objects one after another through the blob store's writer (1 MiB writes, the fsync
and rename an upload does), reads each back as storage does, and promotes it; in one round
each object stays in the page cache, in the next each is dropped with ``release_pages`` on
the handle that read it, as storage does now. Prints the CPU (user + system) and wall
time of the writes, per object, interleaving the two ways for as many rounds as asked.
Works in a temporary directory on the same filesystem as ``--dir`` (default: the system's
temporary directory) and removes it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from shared.blobstore import Area, BlobStore, release_pages
from shared.ids import new_document_id

MIB = 1024 * 1024


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def write_read_promote(store: BlobStore, size_mib: int, forget: bool,
                       piece: bytes) -> tuple[float, float, float]:
    """One object through the store; (CPU, system CPU, wall) seconds of its write."""
    doc_id = new_document_id()
    (cpu0, sys0), wall0 = _cpu(), time.perf_counter()
    with store.writer(Area.STAGING, doc_id) as out:
        for _ in range(size_mib):
            out.write(piece)
    (cpu1, sys1), wall1 = _cpu(), time.perf_counter()
    with store.open(Area.STAGING, doc_id) as staged:
        while staged.read(4 * MIB):
            pass
        if forget:
            release_pages(staged)
    store.promote(doc_id)
    return cpu1 - cpu0, sys1 - sys0, wall1 - wall0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--objects", type=int, default=6, help="objects per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="docproc-page-cache-", dir=args.dir))
    piece = os.urandom(MIB)
    try:
        store = BlobStore(root)
        for round_no in range(args.rounds):
            for forget in (False, True):
                runs = [write_read_promote(store, args.size_mib, forget, piece)
                        for _ in range(args.objects)]
                cpu = sum(r[0] for r in runs) / len(runs)
                sys_cpu = sum(r[1] for r in runs) / len(runs)
                wall = sum(r[2] for r in runs) / len(runs)
                way = "dropped" if forget else "kept   "
                print(f"round {round_no}, pages {way}: write {cpu:.3f} s CPU "
                      f"({sys_cpu:.3f} s system), {wall:.3f} s wall per {args.size_mib} MiB",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
