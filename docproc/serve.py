"""``docproc serve``: the pipeline behind gunicorn, the server functions-framework uses too.

One worker process with threads (as functions-framework runs): the embedded bus and
SecantusDB live in that process, so there must be exactly one. The pipeline is built in the
worker after the fork, and stopped when the worker exits.
"""

from __future__ import annotations

import logging
from typing import Any

import gunicorn.app.base

from docproc.pipeline import Pipeline
from shared.config import Settings

log = logging.getLogger(__name__)


class PipelineServer(gunicorn.app.base.BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, host: str, port: int, threads: int = 8) -> None:
        self.settings = settings
        self.pipeline: Pipeline | None = None
        self.options: dict[str, Any] = {
            "bind": f"{host}:{port}",
            "workers": 1,
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
        self.pipeline = Pipeline(self.settings).start()
        log.info("docproc serving on %s (events: %s, MongoDB: %s)", self.options["bind"],
                 "RabbitMQ" if self.settings.amqp_url else "in-process bus",
                 "server" if self.settings.mongodb_uri else "embedded SecantusDB")
        return self.pipeline.wsgi_app

    def _worker_exit(self, _server: Any, _worker: Any) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline = None
