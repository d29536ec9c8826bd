"""The caller's identity as Kong passes it upstream.

Kong's authentication plugins set ``X-Consumer-Username`` and its ACL plugin sets
``X-Consumer-Groups`` (comma-separated), clearing any values a client sent; traffic that
bypasses Kong is kept out by the mesh (knative/README.md, "Who may call what") and by the
gateway secret (README, "Security").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from werkzeug.datastructures import Headers

from shared.errors import ApiError, unauthenticated

Role = Literal["driver", "agent"]
_GROUP_ROLES: dict[str, Role] = {"agents": "agent", "drivers": "driver"}
MAX_USER_ID = 128


@dataclass(frozen=True)
class Identity:
    user_id: str
    role: Role

    @property
    def is_agent(self) -> bool:
        return self.role == "agent"


def identity_from_headers(headers: Headers | Mapping[str, str]) -> Identity:
    user_id = (headers.get("X-Consumer-Username") or "").strip()
    if not user_id:
        raise unauthenticated()
    if len(user_id) > MAX_USER_ID or not user_id.isprintable():
        raise unauthenticated("malformed X-Consumer-Username")
    groups = {g.strip().lower() for g in (headers.get("X-Consumer-Groups") or "").split(",")}
    # agents outrank drivers when a consumer is in both groups
    for group in ("agents", "drivers"):
        if group in groups:
            return Identity(user_id=user_id, role=_GROUP_ROLES[group])
    if groups - {""}:
        raise ApiError(403, "forbidden", "consumer is in neither the drivers nor the agents group")
    raise unauthenticated("missing X-Consumer-Groups")
