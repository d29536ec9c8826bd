"""``docproc serve``: the pipeline behind gunicorn, the server functions-framework uses too.

One worker process with threads (as functions-framework runs): the embedded bus and
SecantusDB live in that process, so there must be exactly one. With RabbitMQ and a MongoDB
server, ``http_only`` leaves the event functions to `docproc worker` processes (as deployed,
where each function scales on its own) and ``processes`` may then be more than one. The
pipeline is built in each worker after the fork, and stopped when the worker exits.
"""

from __future__ import annotations

import logging
from typing import Any

import gunicorn.app.base
from gunicorn.arbiter import Arbiter
from pymongo.errors import ConnectionFailure

from docproc import heap
from docproc.pipeline import Pipeline
from shared.config import ConfigError, Settings
from shared.mongo import require_own_embedded, unreachable

log = logging.getLogger(__name__)

WORKER_BOOT_ERROR = Arbiter.WORKER_BOOT_ERROR


class PipelineServer(gunicorn.app.base.BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, host: str, port: int, threads: int = 8, *,
                 http_only: bool = False, processes: int = 1) -> None:
        if (http_only or processes > 1) and not (settings.amqp_url and settings.mongodb_uri):
            raise ConfigError(
                "AMQP_URL and MONGODB_URI: serving HTTP only, or from more than one process, "
                "needs RabbitMQ to carry the events and a MongoDB server all processes share "
                "(the embedded bus and database live in a single process)")
        if processes < 1:
            raise ConfigError(f"processes must be at least 1, not {processes}")
        require_own_embedded(settings)  # here, before the fork, where it can exit cleanly
        self.settings = settings
        self.consumers = not http_only
        self.pipeline: Pipeline | None = None
        self.options: dict[str, Any] = {
            "bind": f"{host}:{port}",
            "workers": processes,
            "worker_class": "gthread",
            "threads": threads,
            # Large documents stream for as long as they take; no worker timeout kills them.
            "timeout": 0,
            "graceful_timeout": 20,
            "loglevel": "warning",
            "accesslog": None,
            "worker_exit": self._worker_exit,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        try:
            self.pipeline = Pipeline(self.settings, consumers=self.consumers).start()
        except ConnectionFailure as exc:
            # One line rather than gunicorn's traceback; the exit code is gunicorn's "worker
            # failed to boot", which stops the server rather than start another worker.
            waited = (f" after {self.settings.startup_wait_seconds:g} s"
                      if self.settings.mongodb_uri else "")
            log.error("docproc: database unreachable%s: %s", waited, unreachable(exc))
            raise SystemExit(WORKER_BOOT_ERROR) from None
        heap.settle()  # in the worker process: gunicorn calls load() after the fork
        log.info("docproc serving on %s (events: %s, MongoDB: %s)", self.options["bind"],
                 "RabbitMQ" if self.settings.amqp_url else "in-process bus",
                 "server" if self.settings.mongodb_uri else "embedded SecantusDB")
        return self.pipeline.wsgi_app

    def _worker_exit(self, _server: Any, _worker: Any) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline = None
