"""The ops port's server (`docproc worker --ops-port`): probes and metrics must not wait on
a connection that is gone by the time the server accepts it."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import make_server

from docproc.health import _Quiet, _Threaded


def _app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_a_wake_up_with_no_connection_waiting_does_not_block_the_server() -> None:
    # What serve_forever does when select reports the listening socket readable: should
    # the connection be gone by then, a blocking accept would hold the loop (and every
    # later probe) until some other connection came.
    server = make_server("127.0.0.1", 0, _app, server_class=_Threaded, handler_class=_Quiet)
    try:
        step = threading.Thread(target=server._handle_request_noblock,  # type: ignore[attr-defined]
                                daemon=True)
        step.start()
        step.join(2)
        assert not step.is_alive()
    finally:
        server.server_close()
