"""Freezing start-up's objects (docproc/heap.py). Each case runs in a process of its own:
freezing is process-wide and would otherwise reach into the test runner's objects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_settle_freezes_what_exists_and_later_cycles_are_still_collected() -> None:
    out = _run("""
        import gc, weakref
        from docproc import heap
        frozen = heap.settle()

        class Node:
            pass

        node = Node()
        node.self = node  # a cycle: only the cyclic collector can free it
        ref = weakref.ref(node)
        del node
        gc.collect()
        print(frozen, ref() is None)
    """)
    frozen, collected = out.split()
    assert int(frozen) > 1000
    assert collected == "True"


def test_a_function_process_settles_once_its_services_are_built(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("AMQP_URL", "MONGODB_URI", "REDIS_URL", "K_SINK")
           and not k.startswith("DOCPROC_")}
    env["DOCPROC_DATA_DIR"] = str(tmp_path / "data")
    out = _run("""
        import gc, os
        assert gc.get_freeze_count() == 0
        from docproc.runtime import services
        services()  # what functions-framework's entry points call on the first event
        print(gc.get_freeze_count(), flush=True)
        os._exit(0)  # the embedded database and the relay would keep the process up
    """, env)
    assert int(out) > 10_000
