"""The API descriptions: OpenAPI 3.1 for the HTTP surface, AsyncAPI 3.0 for the events.

Operations are written out here; every schema comes from the pydantic models the handlers
use (``shared/schemas.py``, ``events/catalog.py``), and a test checks that the operations
match the functions' routes one for one.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from events.catalog import MODELS, dataschema
from shared import schemas as s
from shared.users import MAX_DEVICES

REF = "#/components/schemas/{model}"
_MODELS: list[type[BaseModel]] = [
    s.ErrorBody, s.Accepted, s.DocumentView, s.DocumentPage, s.DocumentPatch, s.LinkRequest,
    s.LinkView, s.DeviceRegistration, s.DeviceRegistered, s.UserView, s.UserPage, s.UserPatch,
    s.AuditPage,
]
_KONG: list[dict[str, list[str]]] = [{"kongConsumer": []}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "invalid request", 401: "no Kong consumer identity",
            403: "not allowed (or the account is disabled)", 404: "no such resource",
            409: "conflicts with the resource's state", 410: "deleted",
            413: "over the upload limit", 415: "media type not accepted",
            416: "range not satisfiable", 503: "a backing service is unavailable; retry"}
    return {str(c): _json(s.ErrorBody, text[c]) for c in codes}


def _param(name: str, where: str, description: str, schema: dict[str, Any] | None = None,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "description": description, "required": required,
            "schema": schema or {"type": "string"}}


DOC_ID = _param("doc_id", "path", "document id", {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                True)
PAGE = [_param("limit", "query", "page size", {"type": "integer", "minimum": 1, "maximum": 200}),
        _param("cursor", "query", "next_cursor of the previous page")]


def _operations() -> dict[str, dict[str, Any]]:
    upload_body = {
        "required": True,
        "content": {
            "application/pdf": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/tiff": {"schema": {"type": "string", "format": "binary"}},
            "image/heic": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"},
                               "kind": {"type": "string"}}}},
        },
    }
    return {
        "/v1/documents": {
            "post": {
                "operationId": "uploadDocument", "summary": "Upload a document",
                "parameters": [
                    _param("X-Filename", "header", "original file name (percent-encoded)"),
                    _param("X-Document-Kind", "header", "document kind"),
                    _param("Idempotency-Key", "header", "a retried upload with the same key "
                           "returns the first document"),
                    _param("X-Gateway-Secret", "header", "set by Kong when the deployment "
                           "requires it (DOCPROC_GATEWAY_SECRET)"),
                ],
                "requestBody": upload_body,
                "responses": {"202": {**_json(s.Accepted, "accepted for processing"),
                                      "headers": {"Location": {"schema": {"type": "string"}}}},
                              "200": {**_json(s.Accepted, "the same bytes from the same user "
                                              "are already a document: that one"),
                                      "headers": {"Location": {"schema": {"type": "string"}}}},
                              **_errors(400, 401, 403, 413, 415, 503)},
            },
            "get": {
                "operationId": "listDocuments",
                "summary": "Browse documents, newest first (drivers: their own)",
                "parameters": [*PAGE,
                               _param("owner", "query", "owner's user id (agents)"),
                               _param("status", "query", "processing, stored, rejected, "
                                      "failed or deleted"),
                               _param("media_type", "query", "e.g. application/pdf"),
                               _param("kind", "query", "document kind"),
                               _param("created_after", "query", "ISO 8601",
                                      {"type": "string", "format": "date-time"}),
                               _param("created_before", "query", "ISO 8601",
                                      {"type": "string", "format": "date-time"}),
                               _param("q", "query", "text in the file name")],
                "responses": {"200": _json(s.DocumentPage, "a page"),
                              **_errors(400, 401, 403, 503)},
            },
        },
        "/v1/documents/{doc_id}": {
            "parameters": [DOC_ID],
            "get": {"operationId": "getDocument", "summary": "A document's status and link",
                    "responses": {"200": _json(s.DocumentView, "the document"),
                                  **_errors(401, 403, 404, 503)}},
            "patch": {"operationId": "patchDocument", "summary": "Set kind, tags, note (agents)",
                      "requestBody": {"required": True, "content": {
                          "application/json": {"schema": _ref(s.DocumentPatch)}}},
                      "responses": {"200": _json(s.DocumentView, "the updated document"),
                                    **_errors(400, 401, 403, 404, 410, 415, 503)}},
            "delete": {"operationId": "deleteDocument",
                       "summary": "Crypto-shred a document (agents; owners while not stored)",
                       "responses": {"200": _json(s.DocumentView, "the tombstone"),
                                     **_errors(401, 403, 404, 410, 503)}},
        },
        "/v1/documents/{doc_id}/link": {
            "parameters": [DOC_ID],
            "post": {"operationId": "newLink", "summary": "A fresh signed download link",
                     "requestBody": {"required": False, "content": {
                         "application/json": {"schema": _ref(s.LinkRequest)}}},
                     "responses": {"201": _json(s.LinkView, "the link"),
                                   **_errors(400, 401, 403, 404, 409, 410, 503)}},
        },
        "/v1/files/{doc_id}": {
            "parameters": [DOC_ID],
            "get": {
                "operationId": "downloadDocument",
                "summary": "Download through a signed link (owner or agent)",
                "parameters": [
                    _param("exp", "query", "expiry, unix seconds", required=True),
                    _param("kid", "query", "signing key id", required=True),
                    _param("sig", "query", "signature", required=True),
                    _param("Range", "header", "a single byte range"),
                    _param("If-None-Match", "header", "ETag from an earlier download"),
                    _param("If-Range", "header", "ETag the range depends on"),
                ],
                "responses": {
                    "200": {"description": "the document",
                            "content": {"*/*": {"schema": {"type": "string",
                                                           "format": "binary"}}}},
                    "206": {"description": "the requested range",
                            "content": {"*/*": {"schema": {"type": "string",
                                                           "format": "binary"}}}},
                    "304": {"description": "not modified"},
                    **_errors(401, 403, 404, 410, 416, 503),
                },
            },
        },
        "/v1/users/me": {
            "get": {"operationId": "getMe", "summary": "The caller's profile",
                    "responses": {"200": _json(s.UserView, "the caller"),
                                  **_errors(401, 403, 503)}},
        },
        "/v1/users/me/devices": {
            "post": {"operationId": "registerDevice", "summary": "Register an FCM token",
                     "description": f"At most {MAX_DEVICES} devices per user: registering "
                                    "another drops the least recently seen.",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref(s.DeviceRegistration)}}},
                     "responses": {"201": _json(s.DeviceRegistered, "registered"),
                                   "200": _json(s.DeviceRegistered, "already registered"),
                                   **_errors(400, 401, 403, 415, 503)}},
        },
        "/v1/users/me/devices/{device}": {
            "parameters": [_param("device", "path", "device id", required=True)],
            "delete": {"operationId": "removeDevice", "summary": "Forget a device token",
                       "responses": {"204": {"description": "removed"},
                                     **_errors(401, 403, 404, 503)}},
        },
        "/v1/users": {
            "get": {"operationId": "listUsers", "summary": "Users (agents)",
                    "parameters": [*PAGE, _param("role", "query", "driver or agent"),
                                   _param("status", "query", "active or disabled")],
                    "responses": {"200": _json(s.UserPage, "a page"),
                                  **_errors(400, 401, 403, 503)}},
        },
        "/v1/users/{user_id}": {
            "parameters": [_param("user_id", "path", "user id", required=True)],
            "get": {"operationId": "getUser", "summary": "A user (agents, or oneself)",
                    "responses": {"200": _json(s.UserView, "the user"),
                                  **_errors(401, 403, 404, 503)}},
            "patch": {"operationId": "patchUser", "summary": "Restrict role, disable (agents)",
                      "requestBody": {"required": True, "content": {
                          "application/json": {"schema": _ref(s.UserPatch)}}},
                      "responses": {"200": _json(s.UserView, "the updated user"),
                                    **_errors(400, 401, 403, 404, 409, 415, 503)}},
        },
        "/v1/audit": {
            "get": {"operationId": "listAudit", "summary": "The audit trail (agents)",
                    "parameters": [*PAGE, _param("actor", "query", "who acted"),
                                   _param("document_id", "query", "which document")],
                    "responses": {"200": _json(s.AuditPage, "a page"),
                                  **_errors(400, 401, 403, 503)}},
        },
        "/v1/openapi.json": {
            "get": {"operationId": "openapi", "summary": "This document", "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}}},
        },
        "/v1/asyncapi.json": {
            "get": {"operationId": "asyncapi", "summary": "The events, as AsyncAPI 3.0",
                    "security": [], "responses": {"200": {"description": "AsyncAPI 3.0"}}},
        },
    }


@cache
def _components() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS], ref_template=REF)
    return dict(defs.get("$defs", {}))


def openapi(server: str = "http://127.0.0.1:8080") -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "docproc", "version": "1",
                 "description": "Document pipeline for field operations. Clients reach it "
                                "through Kong, which authenticates them and forwards the "
                                "consumer as X-Consumer-Username / X-Consumer-Groups."},
        "servers": [{"url": server}],
        "security": _KONG,
        "paths": _operations(),
        "components": {
            "schemas": _components(),
            "securitySchemes": {"kongConsumer": {
                "type": "apiKey", "in": "header", "name": "X-Consumer-Username",
                "description": "set by Kong's authentication plugin, with X-Consumer-Groups "
                               "(drivers or agents) from its ACL plugin"}},
        },
    }


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for event_type, model in MODELS.items():
        name = model.__name__
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
        messages[name] = {
            "name": event_type, "title": name, "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "headers": {"type": "object", "properties": {
                "cloudEvents_type": {"const": event_type},
                "cloudEvents_dataschema": {"const": dataschema(event_type)},
                "cloudEvents_id": {"type": "string"},
                "cloudEvents_subject": {"type": "string", "description": "document id"}}},
        }
        channel = event_type.replace(".", "-")
        channels[channel] = {"address": event_type,
                             "messages": {name: {"$ref": f"#/components/messages/{name}"}}}
        operations[f"on-{channel}"] = {"action": "receive",
                                       "channel": {"$ref": f"#/channels/{channel}"}}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "docproc events", "version": "1",
                 "description": "CloudEvents on the topic exchange <prefix>.events (routing "
                                "key = type), AMQP binding in binary content mode."},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
