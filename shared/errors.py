"""Errors that map to an HTTP answer with a JSON body: {"error": {"code", "message"}}."""

from __future__ import annotations


class ApiError(Exception):
    """A client-facing failure: the status, a stable machine code and a human message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def unauthenticated(message: str = "missing Kong consumer identity") -> ApiError:
    return ApiError(401, "unauthenticated", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str = "no such document") -> ApiError:
    return ApiError(404, "not_found", message)


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def unavailable(message: str, retry_after: int = 5) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": str(retry_after)})
