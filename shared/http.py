"""The thin HTTP layer shared by the HTTP functions: routing, JSON answers, error mapping.

Handlers take a werkzeug ``Request`` (functions-framework hands them Flask's subclass) and
return a werkzeug ``Response``, so the same code runs under functions-framework, inside
``docproc serve`` and in tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pymongo.errors import AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map
from werkzeug.wrappers import Request, Response

from shared.errors import ApiError
from shared.observability import HTTP_REQUESTS, child_traceparent, log_context

log = logging.getLogger(__name__)

Endpoint = Callable[..., Response]
M = TypeVar("M", bound=BaseModel)
_UNAVAILABLE = (ServerSelectionTimeoutError, AutoReconnect, ConnectionFailure)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":"), default=str),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def dispatch(routes: Map, endpoints: dict[str, Endpoint], request: Request, *args: Any) -> Response:
    """Route the request and turn every failure into a JSON error answer."""
    request_id = request.headers.get("X-Request-ID") or request.headers.get("Kong-Request-ID")
    with log_context(request_id=request_id,
                     traceparent=child_traceparent(request.headers.get("traceparent"))):
        response = _dispatch(routes, endpoints, request, *args)
    return response


def _dispatch(routes: Map, endpoints: dict[str, Endpoint], request: Request,
              *args: Any) -> Response:
    name = "unrouted"
    try:
        adapter = routes.bind_to_environ(request.environ)
        endpoint, params = adapter.match()
        name = str(endpoint)
        with log_context(document_id=params.get("doc_id")):
            response = endpoints[name](*args, request, **params)
        HTTP_REQUESTS.labels(name, str(response.status_code)).inc()
        return response
    except ApiError as exc:
        HTTP_REQUESTS.labels(name, str(exc.status)).inc()
        return error_response(exc)
    except _UNAVAILABLE as exc:
        log.warning("database unavailable: %s", exc)
        return error_response(ApiError(503, "unavailable", "database unavailable, retry later",
                                       {"Retry-After": "5"}))
    except HTTPException as exc:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(ApiError(exc.code or 500, code, exc.description or code))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal", "internal error"))


def matches(routes: Map, request: Request) -> bool:
    try:
        routes.bind_to_environ(request.environ).match()
    except HTTPException as exc:
        # A 405 still means the path is ours.
        return exc.code == 405
    return True


def parse_body(request: Request, model: type[M], *, optional: bool = False) -> M:
    """The JSON body validated into ``model``; 400 naming every problem otherwise."""
    if optional and not request.content_length and request.mimetype != "application/json":
        return model()
    try:
        return model.model_validate(read_json(request))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        raise ApiError(400, "invalid_body", problems) from None


def read_json(request: Request, limit: int = 64 * 1024) -> Any:
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send application/json")
    if (request.content_length or 0) > limit:
        raise ApiError(413, "too_large", f"JSON body over {limit} bytes")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, "too_large", f"JSON body over {limit} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
    except RecursionError:  # "[[[[..." nested past the interpreter's stack
        raise ApiError(400, "invalid_json", "body is nested too deeply") from None
