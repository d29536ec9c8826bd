"""Users function (the seed's User Service): profiles, device tokens, administration by
agents, and the audit trail.

Run alone with ``functions-framework --source functions/users/main.py --target users``.
"""

from __future__ import annotations

from typing import Any

import functions_framework
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from docproc.health import function_request, http_function
from docproc.runtime import Services
from shared.access import authenticate, request_id, require_agent
from shared.errors import ApiError, bad_request, not_found
from shared.http import Endpoint, json_response, parse_body
from shared.pagination import parse_limit
from shared.schemas import (
    AuditPage,
    AuditView,
    DeviceRegistered,
    DeviceRegistration,
    UserPage,
    UserPatch,
    UserView,
)
from shared.users import User, device_id

ROUTES = Map([
    Rule("/v1/users/me", methods=["GET"], endpoint="me"),
    Rule("/v1/users/me/devices", methods=["POST"], endpoint="add_device"),
    Rule("/v1/users/me/devices/<device>", methods=["DELETE"], endpoint="remove_device"),
    Rule("/v1/users", methods=["GET"], endpoint="list_users"),
    Rule("/v1/users/<user_id>", methods=["GET"], endpoint="get_user"),
    Rule("/v1/users/<user_id>", methods=["PATCH"], endpoint="patch_user"),
    Rule("/v1/audit", methods=["GET"], endpoint="audit"),
])


def _user_json(user: User, status: int = 200) -> Response:
    return json_response(UserView.model_validate(user.public()).model_dump(mode="json"), status)


def me(svc: Services, request: Request) -> Response:
    ident = authenticate(svc.users, request.headers)
    user = svc.users.get(ident.user_id)
    assert user is not None
    return _user_json(user)


def add_device(svc: Services, request: Request) -> Response:
    ident = authenticate(svc.users, request.headers)
    reg = parse_body(request, DeviceRegistration)
    added = svc.users.add_device(ident.user_id, reg.token, reg.platform)
    body = DeviceRegistered(id=device_id(reg.token), platform=reg.platform, registered=True)
    return json_response(body.model_dump(), 201 if added else 200)


def remove_device(svc: Services, request: Request, device: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    if not svc.users.remove_device(ident.user_id, device):
        raise not_found("no such device")
    return Response(status=204)


def list_users(svc: Services, request: Request) -> Response:
    require_agent(authenticate(svc.users, request.headers))
    args = request.args
    users, cursor = svc.users.page(parse_limit(args.get("limit")), args.get("cursor"),
                                   role=args.get("role"), status=args.get("status"))
    page = UserPage(items=[UserView.model_validate(u.public()) for u in users],
                    next_cursor=cursor)
    return json_response(page.model_dump(mode="json"))


def get_user(svc: Services, request: Request, user_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    if user_id != ident.user_id:
        require_agent(ident)
    user = svc.users.get(user_id)
    if user is None:
        raise not_found("no such user")
    return _user_json(user)


def patch_user(svc: Services, request: Request, user_id: str) -> Response:
    ident = authenticate(svc.users, request.headers)
    require_agent(ident)
    body = parse_body(request, UserPatch)
    changes: dict[str, Any] = body.model_dump(exclude_unset=True)
    if not changes:
        raise bad_request("nothing to change: send role, status or display_name",
                          code="invalid_body")
    if user_id == ident.user_id and (changes.get("status") == "disabled"
                                     or changes.get("role") == "driver"):
        raise ApiError(409, "conflict", "agents cannot disable or demote themselves")
    if "role" in changes:
        # Kong's ACL groups stay the authority: an agent can only restrict a consumer to
        # driver rights (or lift that restriction), never raise anyone above their group.
        changes["role_limit"] = "driver" if changes.pop("role") == "driver" else None
    if svc.users.get(user_id) is None:
        raise not_found("no such user")
    user = svc.users.update(user_id, changes)
    if user is None:
        raise not_found("no such user")
    svc.audit.record(ident, "user.patch", "user", user_id, request_id(request.headers),
                     changes=body.model_dump(exclude_unset=True))
    return _user_json(user)


def audit(svc: Services, request: Request) -> Response:
    require_agent(authenticate(svc.users, request.headers))
    args = request.args
    entries, cursor = svc.audit.page(parse_limit(args.get("limit")), args.get("cursor"),
                                     actor=args.get("actor"),
                                     document_id=args.get("document_id"))
    page = AuditPage(items=[AuditView.model_validate(e.public()) for e in entries],
                     next_cursor=cursor)
    return json_response(page.model_dump(mode="json"))


ENDPOINTS: dict[str, Endpoint] = {
    "me": me,
    "add_device": add_device,
    "remove_device": remove_device,
    "list_users": list_users,
    "get_user": get_user,
    "patch_user": patch_user,
    "audit": audit,
}


handle = http_function(ROUTES, ENDPOINTS)


@functions_framework.http
def users(request: Request) -> Response:
    return function_request(handle, request)
