"""Who is calling, and may they: Kong's identity checked against the user's record."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from werkzeug.datastructures import Headers

from shared.errors import ApiError
from shared.identity import Identity, identity_from_headers
from shared.users import UserRepository


def authenticate(users: UserRepository, headers: Headers | Mapping[str, str]) -> Identity:
    """The caller, provisioned on first sight; a disabled user is refused everything."""
    kong = identity_from_headers(headers)
    user = users.ensure(kong)
    if user.status != "active":
        raise ApiError(403, "user_disabled", "this account is disabled")
    return Identity(user_id=kong.user_id, role=user.effective_role(kong.role))


def require_agent(ident: Identity) -> None:
    if not ident.is_agent:
        raise ApiError(403, "forbidden", "only agents may do this")


def request_id(headers: Headers | Mapping[str, str]) -> str:
    """Kong's correlation id when it set one, so an audit entry leads to the gateway's logs."""
    for name in ("X-Request-ID", "Kong-Request-ID", "X-Correlation-ID"):
        value = headers.get(name)
        if value and len(value) <= 128 and value.isprintable():
            return value
    return uuid.uuid4().hex
