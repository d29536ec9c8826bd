"""Liveness, readiness and metrics endpoints, for every function however it runs.

``/healthz`` answers while the process can serve; ``/readyz`` only while the services it
needs answer (MongoDB always; RabbitMQ for event consumers when it is configured), so
Knative stops sending traffic to an instance that cannot do its work; ``/metrics`` is the
Prometheus exposition.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pika
import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo.errors import ConnectionFailure, PyMongoError
from werkzeug.routing import Map
from werkzeug.wrappers import Request, Response

from docproc.runtime import Services, services
from shared.errors import ApiError
from shared.http import Endpoint, dispatch, error_response, json_response
from shared.mongo import unreachable

log = logging.getLogger(__name__)

PATHS = ("/healthz", "/readyz", "/metrics")
WITHOUT_SERVICES = ("/healthz", "/metrics")  # nothing the database holds


def checks(svc: Services, needs_broker: bool) -> tuple[bool, dict[str, str]]:
    results: dict[str, str] = {}
    ready = True
    try:
        svc.mongo.client.admin.command("ping")
        results["mongodb"] = "ok"
    except PyMongoError as exc:
        results["mongodb"] = f"unreachable: {type(exc).__name__}"
        ready = False
    url = svc.settings.amqp_url
    if needs_broker and url:
        params = pika.URLParameters(url)
        params.socket_timeout = params.blocked_connection_timeout = 2
        try:
            pika.BlockingConnection(params).close()
            results["rabbitmq"] = "ok"
        except Exception as exc:  # pika raises a family of its own
            results["rabbitmq"] = f"unreachable: {type(exc).__name__}"
            ready = False
    if svc.settings.redis_url:
        # Redis only speeds lookups up: reported, never a reason to stop serving.
        try:
            redis.Redis.from_url(svc.settings.redis_url, socket_timeout=1).ping()
            results["redis"] = "ok"
        except redis.RedisError:
            results["redis"] = "unreachable (degraded: reading through to MongoDB)"
    return ready, results


def respond(svc: Services, path: str, needs_broker: bool) -> Response:
    if path in WITHOUT_SERVICES:
        return respond_without_services(path)
    ready, results = checks(svc, needs_broker)
    return json_response({"status": "ready" if ready else "unavailable", "checks": results},
                         200 if ready else 503)


def respond_without_services(path: str) -> Response:
    """Liveness and metrics, which need nothing the database holds."""
    if path == "/healthz":
        return json_response({"status": "ok"})
    return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)


def not_started(path: str, exc: ConnectionFailure) -> Response:
    """The answer of a function whose services could not be built because MongoDB does not
    answer: alive (so the kubelet does not restart it into a crash loop while the database
    is away), not ready, and a 503 the client may retry rather than a 500. Liveness and
    metrics are answered before any try (``respond_without_services``)."""
    log.warning("database unavailable: %s", unreachable(exc))
    if path == "/readyz":
        return json_response({"status": "unavailable",
                              "checks": {"mongodb": f"unreachable: {type(exc).__name__}"}}, 503)
    return error_response(ApiError(503, "unavailable", "database unavailable, retry later",
                                   {"Retry-After": "5"}))


def function_request(handle: Callable[[Services, Request], Response],
                     request: Request) -> Response:
    """A request to an HTTP function run by functions-framework, whose services are built on
    first use. Liveness does not wait for them (building them waits seconds for a database
    that does not answer, longer than the probe's timeout)."""
    if request.method == "GET" and request.path in WITHOUT_SERVICES:
        return respond_without_services(request.path)
    try:
        svc = services()
    except ConnectionFailure as exc:
        return not_started(request.path, exc)
    return handle(svc, request)


def add_to_flask(app: Any, svc: Callable[[], Services], needs_broker: bool) -> None:
    """Give a functions-framework CloudEvent app (which routes only POSTs to the function)
    the three GET endpoints."""
    for path in PATHS:
        def view(path: str = path) -> Response:
            if path in WITHOUT_SERVICES:
                return respond_without_services(path)
            try:
                built = svc()
            except ConnectionFailure as exc:
                return not_started(path, exc)
            return respond(built, path, needs_broker)

        app.add_url_rule(path, endpoint=f"docproc{path.replace('/', '_')}", view_func=view,
                         methods=["GET"])


def http_function(routes: Map, endpoints: dict[str, Endpoint]) -> Callable[[Services, Request],
                                                                        Response]:
    """An HTTP function's handler: its routes, plus the health and metrics endpoints."""
    def handle(svc: Services, request: Request) -> Response:
        if request.method == "GET" and request.path in PATHS:
            return respond(svc, request.path, needs_broker=False)
        refused = gateway_check(svc, request)
        if refused is not None:
            return refused
        return dispatch(routes, endpoints, request, svc)

    return handle


def gateway_check(svc: Services, request: Request) -> Response | None:
    """Refuse requests that did not come through Kong, when a gateway secret is set."""
    expected = svc.settings.gateway_secret
    if expected is None:
        return None
    given = request.headers.get("X-Gateway-Secret", "")
    if hmac.compare_digest(given.encode(), expected.encode()):
        return None
    return error_response(ApiError(401, "unauthenticated",
                                   "request did not come through the API gateway"))


class _Threaded(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_activate(self) -> None:
        super().server_activate()
        # serve_forever accepts once select says a connection waits; should none be there
        # by then, a blocking accept would wait for the next one with the probes and
        # metrics unanswered (a test server hung so in CI). Non-blocking, it just returns.
        self.socket.setblocking(False)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass


def serve_in_background(svc: Services, host: str, port: int, needs_broker: bool) -> Any:
    """The endpoints on their own port, for `docproc worker`."""
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = Request(environ).path
        response = (respond(svc, path, needs_broker) if path in PATHS
                    else json_response({"error": {"code": "not_found", "message": path}}, 404))
        return response(environ, start_response)

    server = make_server(host, port, app, server_class=_Threaded, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="ops-http").start()
    return server
