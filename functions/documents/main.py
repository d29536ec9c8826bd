"""Documents function (the seed's Document Processor Service, and browsing for agents).

Run alone with ``functions-framework --source functions/documents/main.py --target documents``.
"""

from __future__ import annotations

import functions_framework
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from docproc.apidoc import asyncapi, openapi
from docproc.health import function_request, http_function
from docproc.runtime import Services
from functions.documents import manage
from functions.documents.upload import upload
from shared.http import Endpoint, json_response

ROUTES = Map([
    Rule("/v1/documents", methods=["POST"], endpoint="upload"),
    Rule("/v1/documents", methods=["GET"], endpoint="browse"),
    Rule("/v1/documents/<doc_id>", methods=["GET"], endpoint="status"),
    Rule("/v1/documents/<doc_id>", methods=["PATCH"], endpoint="patch"),
    Rule("/v1/documents/<doc_id>", methods=["DELETE"], endpoint="delete"),
    Rule("/v1/documents/<doc_id>/link", methods=["POST"], endpoint="link"),
    Rule("/v1/openapi.json", methods=["GET"], endpoint="openapi"),
    Rule("/v1/asyncapi.json", methods=["GET"], endpoint="asyncapi"),
])


def _openapi(svc: Services, request: Request) -> Response:
    return json_response(openapi(svc.settings.public_url))


def _asyncapi(svc: Services, request: Request) -> Response:
    return json_response(asyncapi())


ENDPOINTS: dict[str, Endpoint] = {
    "upload": upload,
    "browse": manage.browse,
    "status": manage.status,
    "patch": manage.patch,
    "delete": manage.delete,
    "link": manage.new_link,
    "openapi": _openapi,
    "asyncapi": _asyncapi,
}


handle = http_function(ROUTES, ENDPOINTS)


@functions_framework.http
def documents(request: Request) -> Response:
    return function_request(handle, request)
