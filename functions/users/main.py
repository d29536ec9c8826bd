"""Users function (the seed's User Service): the caller's profile and FCM device tokens.

Run alone with ``functions-framework --source functions/users/main.py --target users``.
"""

from __future__ import annotations

from typing import Literal

import functions_framework
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from docproc.runtime import Services, services
from shared.errors import bad_request
from shared.http import Endpoint, dispatch, json_response, read_json
from shared.identity import identity_from_headers
from shared.users import User

ROUTES = Map([
    Rule("/v1/users/me", methods=["GET"], endpoint="me"),
    Rule("/v1/users/me/devices", methods=["POST"], endpoint="add_device"),
])


class DeviceRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # FCM registration tokens are ~150-200 characters; the cap only stops abuse.
    token: str = Field(min_length=1, max_length=4096, pattern=r"^[\x21-\x7e]+$")
    platform: Literal["android", "ios", "web"]


def _public(user: User) -> dict[str, object]:
    return {
        "id": user.id,
        "role": user.role,
        "status": user.status,
        "devices": [{"platform": d.platform, "added_at": d.added_at.isoformat(),
                     "last_seen": d.last_seen.isoformat()} for d in user.devices],
    }


def me(svc: Services, request: Request) -> Response:
    ident = identity_from_headers(request.headers)
    return json_response(_public(svc.users.ensure(ident)))


def add_device(svc: Services, request: Request) -> Response:
    ident = identity_from_headers(request.headers)
    try:
        reg = DeviceRegistration.model_validate(read_json(request))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        raise bad_request(problems, code="invalid_device") from None
    added = svc.users.add_device(ident, reg.token, reg.platform)
    return json_response({"platform": reg.platform, "registered": True}, 201 if added else 200)


ENDPOINTS: dict[str, Endpoint] = {"me": me, "add_device": add_device}


def handle(svc: Services, request: Request) -> Response:
    return dispatch(ROUTES, ENDPOINTS, request, svc)


@functions_framework.http
def users(request: Request) -> Response:
    return handle(services(), request)
