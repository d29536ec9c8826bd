"""The whole pipeline in one process: every HTTP function behind one WSGI app, and every
event function subscribed either to the in-process bus (no AMQP_URL) or to RabbitMQ."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from werkzeug.wrappers import Request, Response

from docproc.health import PATHS, gateway_check, respond
from docproc.outbox import OutboxRelay
from docproc.registry import EVENT_FUNCTIONS, HTTP_FUNCTIONS
from docproc.runtime import Services, build_services
from events.bus import InProcessBus
from events.runner import RabbitRunner
from events.subscriptions import RetryPolicy
from shared.config import Settings
from shared.errors import ApiError
from shared.http import error_response, matches
from shared.mongo import require_own_embedded

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, settings: Settings, consumers: bool = True) -> None:
        """``consumers=False`` serves HTTP and publishes only, leaving the event functions to
        `docproc worker` processes (RabbitMQ)."""
        self.settings = settings
        # A MongoDB server may still be starting (a host or deploy restarting together); the
        # embedded one answers at once.
        wait = settings.startup_wait_seconds if settings.mongodb_uri else 0.0
        policy = RetryPolicy(settings.retry_delays)
        self.bus: InProcessBus | None = None
        self.runners: list[RabbitRunner] = []
        self._threads: list[threading.Thread] = []
        if settings.amqp_url or settings.k_sink:
            # Events leave the process: to RabbitMQ (consumed here unless `consumers` is
            # false) or to a Knative sink, whose broker delivers them to the functions.
            self.services = build_services(settings, wait_for_database_seconds=wait)
            amqp_url = settings.amqp_url
            for make in EVENT_FUNCTIONS.values():
                if not consumers or amqp_url is None:
                    break
                self.runners.append(RabbitRunner(
                    amqp_url, settings.amqp_prefix, make(self.services), policy,
                    settings.worker_concurrency, settings.worker_batch))
        else:
            require_own_embedded(settings)
            self.services = build_services(settings, wait_for_database_seconds=wait)
            self.bus = InProcessBus(policy, self.services.mongo.db,
                                    concurrency=min(settings.worker_concurrency, 4),
                                    exclusive=self.services.mongo.embedded is not None)
            self.services.publisher = self.bus
            for make in EVENT_FUNCTIONS.values():
                self.bus.subscribe(make(self.services))

        self.relay = OutboxRelay(self.services)

    @property
    def svc(self) -> Services:
        return self.services

    def start(self) -> Pipeline:
        if self.bus is not None:
            self.bus.start()
        self.relay.start()
        for runner in self.runners:
            t = threading.Thread(target=runner.run, name=f"worker-{runner.sub.name}", daemon=True)
            t.start()
            self._threads.append(t)
        for runner in self.runners:
            if not runner.ready.wait(15):
                raise RuntimeError(f"worker {runner.sub.name} could not subscribe to RabbitMQ")
        return self

    def stop(self) -> None:
        self.relay.stop()
        for runner in self.runners:
            runner.stop()
        for t in self._threads:
            t.join(timeout=10)
        if self.bus is not None:
            self.bus.stop()
        self.services.close()

    def wsgi_app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        response = self.route(request)
        return response(environ, start_response)

    def route(self, request: Request) -> Response:
        if request.method == "GET" and request.path in PATHS:
            return respond(self.services, request.path, needs_broker=bool(self.runners))
        refused = gateway_check(self.services, request)
        if refused is not None:
            return refused
        for fn in HTTP_FUNCTIONS:
            if matches(fn.routes, request):
                return fn.handle(self.services, request)
        return error_response(ApiError(404, "not_found", f"no route for {request.path}"))
