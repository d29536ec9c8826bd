"""Loopback stub of Google's OAuth2 token endpoint and the FCM HTTP v1 send API.

Used by tests and benchmarks to drive the *real* firebase-admin client without any
network access: everything listens on 127.0.0.1 on an ephemeral port.

Endpoints:

* ``POST /token`` -- accepts the JWT-bearer grant google-auth sends for service-account
  credentials (the assertion is decoded but not verified) and answers
  ``{"access_token": "stub-token-N", "token_type": "Bearer", "expires_in": 3600}``.
* ``POST /v1/projects/<project>/messages:send`` -- requires a bearer token issued by
  ``/token`` (401 otherwise), validates the request body (a ``message`` object with exactly
  one of ``token``/``topic``/``condition``) and answers ``{"name": "projects/<p>/messages/<n>"}``.

Failures can be injected with :meth:`FcmStub.fail_next` and :meth:`FcmStub.unregister`;
the error bodies follow the shape FCM really returns (``google.rpc.Status`` with an
``FcmError`` detail), so firebase-admin maps them to its own exception types.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import threading
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers import nonblocking

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
TOKEN_PREFIX = "stub-token-"

# HTTP status -> (google.rpc status, FCM error code or None, message)
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: (
        "UNAUTHENTICATED",
        None,
        "Request is missing required authentication credential.",
    ),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    429: (
        "RESOURCE_EXHAUSTED",
        "QUOTA_EXCEEDED",
        "Quota exceeded for quota metric 'Send requests'.",
    ),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}


def fcm_error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """The JSON error body FCM answers with for ``status``."""
    rpc_status, fcm_code, default_message = _ERRORS.get(status, ("UNKNOWN", None, "Unknown error."))
    error: dict[str, Any] = {
        "code": status,
        "message": message or default_message,
        "status": rpc_status,
    }
    if fcm_code is not None:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}]
    return {"error": error}


def _decode_jwt_claims(assertion: str) -> dict[str, Any] | None:
    """Decode the payload of a compact JWS *without* verifying its signature."""
    parts = assertion.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class FcmStub:
    """Context manager running the stub on ``127.0.0.1`` (ephemeral port) in a daemon thread."""

    def __init__(self, project_id: str = "docproc-stub") -> None:
        self.project_id = project_id
        self.base_url = ""
        self._lock = threading.Lock()
        self._received: list[dict[str, Any]] = []
        self._token_requests: list[dict[str, Any]] = []
        self._issued: set[str] = set()
        self._unregistered: set[str] = set()
        self._failures: deque[tuple[int, int | None]] = deque()
        self._token_counter = itertools.count(1)
        self._message_counter = itertools.count(1)
        self._send_attempts = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FcmStub:
        if self._server is not None:
            return self
        server = nonblocking(ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self)))
        server.daemon_threads = True
        self._server = server
        host, port = server.server_address[:2]
        self.base_url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fcm-stub-{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FcmStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------

    def unregister(self, token: str) -> None:
        """Later sends to ``token`` get FCM's 404 UNREGISTERED error."""
        with self._lock:
            self._unregistered.add(token)

    def fail_next(self, count: int, status: int = 503, retry_after: int | None = None) -> None:
        """The next ``count`` send requests (any token) answer ``status``."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def write_service_account(self, path: Path) -> Path:
        """Write a service-account JSON whose ``token_uri`` points at this stub."""
        if not self.base_url:
            raise RuntimeError("start the stub before writing a service account")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        ).decode("ascii")
        email = f"firebase-adminsdk-stub@{self.project_id}.iam.gserviceaccount.com"
        info = {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": uuid.uuid4().hex,
            "private_key": pem,
            "client_email": email,
            "client_id": str(uuid.uuid4().int)[:21],
            "auth_uri": f"{self.base_url}/auth",
            "token_uri": f"{self.base_url}/token",
            "universe_domain": "googleapis.com",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2), encoding="utf-8")
        path.chmod(0o600)
        return path

    # -- inspection ----------------------------------------------------------------------

    @property
    def received(self) -> list[dict[str, Any]]:
        """Accepted messages (the request's ``message`` object plus ``_auth``), a snapshot."""
        with self._lock:
            return list(self._received)

    @property
    def token_requests(self) -> list[dict[str, Any]]:
        """Decoded (unverified) JWT claims of every accepted token request."""
        with self._lock:
            return list(self._token_requests)

    @property
    def issued_tokens(self) -> set[str]:
        with self._lock:
            return set(self._issued)

    @property
    def send_attempts(self) -> int:
        """Number of requests that reached the send endpoint (including failed ones)."""
        with self._lock:
            return self._send_attempts

    def messages_for(self, token: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self._received if m.get("token") == token]

    # -- request handling (called from server threads) -----------------------------------

    def _issue_token(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", [""])[0]
        assertion = form.get("assertion", [""])[0]
        if grant != JWT_BEARER_GRANT:
            return 400, {"error": "unsupported_grant_type", "error_description": grant}
        claims = _decode_jwt_claims(assertion)
        if claims is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT."}
        with self._lock:
            token = f"{TOKEN_PREFIX}{next(self._token_counter)}"
            self._issued.add(token)
            self._token_requests.append(claims)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600}

    def _send(
        self, project: str, auth: str | None, raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self._send_attempts += 1
            issued = set(self._issued)
        if project != self.project_id:
            return 404, fcm_error_body(404, "Requested entity was not found."), {}
        scheme, _, token = (auth or "").partition(" ")
        if scheme.lower() != "bearer" or token not in issued:
            return 401, fcm_error_body(401), {}
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return 400, fcm_error_body(400, "Invalid JSON payload received."), {}
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return 400, fcm_error_body(400, "Missing required field: message"), {}
        targets = [k for k in ("token", "topic", "condition") if message.get(k)]
        if len(targets) != 1:
            return 400, fcm_error_body(400, "Exactly one of token, topic or condition"), {}
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
            if failure is None and message.get("token") in self._unregistered:
                failure = (404, None)
            if failure is None and not body.get("validate_only"):
                self._received.append({**message, "_auth": auth})
            number = next(self._message_counter)
        if failure is not None:
            status, retry_after = failure
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return status, fcm_error_body(status), headers
        name = f"projects/{self.project_id}/messages/{number}"
        return 200, {"name": name}, {}


def _make_handler(stub: FcmStub) -> type[BaseHTTPRequestHandler]:
    send_prefix = "/v1/projects/"
    send_suffix = "/messages:send"

    class Handler(BaseHTTPRequestHandler):
        # Without it every answer waits out a delayed ACK (40 ms a push).
        disable_nagle_algorithm = True

        protocol_version = "HTTP/1.1"  # keep-alive, as requests' connection pool expects
        server_version = "FcmStub/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            return  # keep test output quiet

        def _reply(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def do_POST(self) -> None:
            raw = self._body()
            path = self.path.split("?", 1)[0]
            if path == "/token":
                form = parse_qs(raw.decode("utf-8"))
                status, payload = stub._issue_token(form)
                self._reply(status, payload)
            elif path.startswith(send_prefix) and path.endswith(send_suffix):
                project = path[len(send_prefix) : -len(send_suffix)]
                status, payload, headers = stub._send(
                    project, self.headers.get("Authorization"), raw
                )
                self._reply(status, payload, headers)
            else:
                self._reply(404, fcm_error_body(404, f"No handler for {path}"))

        def do_GET(self) -> None:
            self._body()
            self._reply(404, fcm_error_body(404, f"No handler for {self.path}"))

    return Handler
