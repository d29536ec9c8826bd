"""Push notifications: Firebase Cloud Messaging (via firebase-admin) and a local JSONL outbox.

``FcmSender`` drives the real firebase-admin client.  Two things about firebase-admin 7.7
shape this module (see ``firebase_admin/messaging.py`` and ``firebase_admin/_http_client.py``):

* **Endpoint.**  ``messaging._MessagingService`` hard-codes
  ``FCM_URL = 'https://fcm.googleapis.com/v1/projects/{0}/messages:send'`` and, in its
  ``__init__``, formats it into the *instance* attribute ``_fcm_url`` (and
  ``_fcm_topic_url`` for ``.../registrations``).  There is no app option or environment
  variable for the FCM host (``FIREBASE_CONFIG`` / ``GOOGLE_CLOUD_PROJECT`` only cover
  options and the project id, and there is no messaging emulator).  So when an endpoint is
  configured we rewrite those two attributes on the messaging service instance that
  belongs to *our own* App; the class and every other App are left untouched.

* **Built-in retries.**  ``_http_client.DEFAULT_RETRY_CONFIG`` is a urllib3 ``Retry(connect=1,
  read=1, status=4, status_forcelist=[500, 503], backoff_factor=0.5, raise_on_status=False,
  allowed_methods=None)`` mounted on the authorized ``requests`` session for ``http://`` and
  ``https://`` (and again, with a 100-connection pool, for ``https://fcm.googleapis.com``).
  Measured against the loopback stub: five 503s take ~7 s (backoff 0, 1, 2, 4 s) before the
  error surfaces.  Worse, urllib3 honours ``Retry-After`` for 413/429/503 even when the
  status is not in the forcelist, so a 429 with ``Retry-After: 7`` makes ``send_each`` sleep
  7 s four times (~28 s) and a 503 ``Retry-After`` may block for up to urllib3's 6 h cap.
  The pipeline has its own retry scheduling (``PushResult.outcome == "retry"`` with
  ``retry_after``), so we mount our own adapter on this App's session for the FCM base URL:
  at most two quick retries of 500/503 *without* a ``Retry-After`` header, and no sleeping
  on ``Retry-After`` at all -- such responses are handed straight back to the caller.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, cast

import firebase_admin
import google.auth.exceptions
import requests
from firebase_admin import credentials, exceptions, messaging
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

__all__ = [
    "DEFAULT_FCM_ENDPOINT",
    "FcmSender",
    "OutboxSender",
    "PushMessage",
    "PushResult",
    "PushSender",
]

Outcome = Literal["sent", "unregistered", "retry", "failed"]

DEFAULT_FCM_ENDPOINT = "https://fcm.googleapis.com"

# firebase-admin starts one thread per message in send_each (max 500 per call); keep the
# fan-out bounded.
_SEND_BATCH = 100
# requests applies it to the connect and to each read: FCM answers in well under a second,
# and a delivery's lease must outlast the worst case below.
_HTTP_TIMEOUT_SECONDS = 15.0
# The most tries of one request: the retry policy's total (below) plus the first.
_FCM_TRIES = 3
# The longest a send of up to _SEND_BATCH messages (side by side) takes to answer or give
# up: every try connecting and reading to the timeout, plus the backoff sleeps (< 2.5 s).
_FCM_BATCH_WORST_SECONDS = _FCM_TRIES * 2 * _HTTP_TIMEOUT_SECONDS + 5.0
_POOL_SIZE = 100  # same pool size firebase-admin mounts for fcm.googleapis.com


@dataclass(frozen=True)
class PushMessage:
    token: str
    title: str
    body: str
    data: Mapping[str, str]


@dataclass(frozen=True)
class PushResult:
    token: str
    # retry = transient (429, 5xx, unavailable, quota, network);
    # failed = permanent (invalid argument, sender id mismatch, ...)
    outcome: Outcome
    message_id: str | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds, from Retry-After when FCM gave one


class PushSender(Protocol):
    def worst_case_seconds(self, count: int) -> float:
        """The longest one ``send`` of ``count`` messages takes to answer or give up (a
        delivery's lease must outlast it)."""
        ...

    def send(self, messages: Sequence[PushMessage]) -> list[PushResult]:
        """Send ``messages``; one result per message, in the same order."""
        ...


class _NoSleepOnRetryAfter(Retry):
    """urllib3 retry policy that never retries (and so never sleeps) on a Retry-After.

    A response carrying ``Retry-After`` is returned as is, so the caller can schedule the
    retry itself; other 500/503 answers are retried per ``status``/``backoff_factor``.
    ``Retry.new()`` re-instantiates ``type(self)``, so the subclass survives increments.
    """

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if has_retry_after:
            return False
        return super().is_retry(method, status_code, has_retry_after)


_FCM_HTTP_RETRY = _NoSleepOnRetryAfter(
    total=_FCM_TRIES - 1,  # whatever the mix of connect, read and status errors
    connect=1,
    read=1,
    status=2,
    status_forcelist=[500, 503],
    backoff_factor=0.2,  # sleeps 0 s, then 0.4 s: worst case well under a second
    backoff_max=2.0,
    raise_on_status=False,  # hand the last error response to firebase-admin to classify
    respect_retry_after_header=False,
    allowed_methods=None,  # firebase-admin retries POST sends too
)

_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    messaging.QuotaExceededError,
    exceptions.UnavailableError,
    exceptions.InternalError,
    exceptions.ResourceExhaustedError,
    exceptions.DeadlineExceededError,
)


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _http_status_and_retry_after(error: BaseException) -> tuple[int | None, float | None]:
    response: Any = getattr(error, "http_response", None)
    if response is None:
        cause = getattr(error, "cause", None)
        response = getattr(cause, "response", None)
    if response is None:
        return None, None
    status = getattr(response, "status_code", None)
    headers = getattr(response, "headers", None) or {}
    retry_after = _parse_retry_after(headers.get("Retry-After"))
    return (status if isinstance(status, int) else None), retry_after


def _is_transport_error(error: BaseException | None) -> bool:
    """Network / token-endpoint trouble that may go away on its own."""
    for _ in range(10):  # bounded walk down the cause chain
        if error is None:
            return False
        if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(error, google.auth.exceptions.TransportError):
            return True
        if isinstance(error, google.auth.exceptions.RefreshError):
            return bool(getattr(error, "retryable", False))
        error = getattr(error, "cause", None) or error.__cause__
    return False


def _classify(token: str, error: BaseException) -> PushResult:
    description = f"{type(error).__name__}: {error}"
    status, retry_after = _http_status_and_retry_after(error)
    if isinstance(error, messaging.UnregisteredError) or (
        # Older FCM answers: NOT_FOUND without the UNREGISTERED detail.  Only this exact
        # message means "token gone"; a 404 for a bad URL/project must not drop tokens.
        isinstance(error, exceptions.NotFoundError)
        and "requested entity was not found" in str(error).lower()
    ):
        return PushResult(token, "unregistered", error=description)
    transient = (
        isinstance(error, _RETRYABLE_ERRORS)
        or (status is not None and (status == 429 or status >= 500))
        or _is_transport_error(error)
    )
    if transient:
        return PushResult(token, "retry", error=description, retry_after=retry_after)
    return PushResult(token, "failed", error=description)


def _build_message(message: PushMessage) -> Any:
    fcm_message = messaging.Message(
        notification=messaging.Notification(title=message.title, body=message.body),
        data=dict(message.data) or None,
        android=messaging.AndroidConfig(priority="high"),
        apns=messaging.APNSConfig(
            headers={"apns-priority": "10", "apns-push-type": "alert"},
            payload=messaging.APNSPayload(
                aps=messaging.Aps(sound="default", content_available=True)
            ),
        ),
    )
    # firebase-admin 7.7 deprecates ``Message(token=...)`` in favour of ``fid`` (Firebase
    # installation IDs) and warns in ``__init__``.  Our devices hold FCM *registration
    # tokens*, which the v1 API still addresses via ``message.token`` and which the encoder
    # still serialises from this public attribute; setting it after construction avoids a
    # DeprecationWarning per message without touching the (process-global) warning filters.
    fcm_message.token = message.token
    return fcm_message


class FcmSender:
    """Sends through a dedicated firebase-admin App (FCM HTTP v1)."""

    def __init__(
        self,
        credentials_path: Path,
        *,
        endpoint: str | None = None,
        app_name: str | None = None,
    ) -> None:
        certificate = credentials.Certificate(str(credentials_path))
        project_id = cast(str | None, certificate.project_id)
        if not project_id:
            raise ValueError(f"{credentials_path}: service account JSON has no project_id")
        self.project_id: str = project_id
        self.endpoint: str = (endpoint or DEFAULT_FCM_ENDPOINT).rstrip("/")
        name = app_name or f"docproc-push-{uuid.uuid4().hex}"
        self._app_name = name
        self._app: Any = firebase_admin.initialize_app(
            certificate,
            {"projectId": project_id, "httpTimeout": _HTTP_TIMEOUT_SECONDS},
            name=name,
        )
        try:
            self._configure_messaging_service()
        except Exception:
            firebase_admin.delete_app(self._app)
            raise

    @property
    def app_name(self) -> str:
        return self._app_name

    def worst_case_seconds(self, count: int) -> float:
        # send() goes through its batches one after another.
        return max(1, math.ceil(count / _SEND_BATCH)) * _FCM_BATCH_WORST_SECONDS

    def _configure_messaging_service(self) -> None:
        # The service is created lazily and cached per App; later
        # ``messaging.send_each(..., app=self._app)`` calls reuse this very instance.
        service: Any = messaging._get_messaging_service(self._app)
        if self.endpoint != DEFAULT_FCM_ENDPOINT:
            # No supported option for the FCM host in firebase-admin 7.7: rewrite the URLs
            # the service formatted in its __init__ (instance attributes, this App only).
            project_path = f"{self.endpoint}/v1/projects/{self.project_id}"
            service._fcm_url = f"{project_path}/messages:send"
            service._fcm_topic_url = f"{project_path}/registrations"
        # Replace the default retry policy for FCM calls (see module docstring).  Mounting
        # on the exact prefix firebase-admin used replaces its adapter for Google's host.
        session = service._client.session
        # requests reads the proxy and CA-bundle environment again on every call, a sixth of
        # a push's CPU time: read it once, here, for the FCM endpoint.
        session.proxies.update(requests.utils.get_environ_proxies(self.endpoint))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            session.verify = bundle
        session.trust_env = False
        session.mount(
            self.endpoint,
            HTTPAdapter(
                pool_connections=_POOL_SIZE,
                pool_maxsize=_POOL_SIZE,
                max_retries=_FCM_HTTP_RETRY,
            ),
        )

    def send(self, messages: Sequence[PushMessage]) -> list[PushResult]:
        results: list[PushResult] = []
        for start in range(0, len(messages), _SEND_BATCH):
            results.extend(self._send_batch(messages[start : start + _SEND_BATCH]))
        return results

    def _send_batch(self, batch: Sequence[PushMessage]) -> list[PushResult]:
        if not batch:
            return []
        if self._app is None:
            raise RuntimeError("FcmSender is closed")
        if len(batch) == 1:
            # send_each starts a thread pool per call; one message needs none.
            try:
                message_id = messaging.send(_build_message(batch[0]), app=self._app)
            except ValueError as error:
                return [PushResult(batch[0].token, "failed", error=f"ValueError: {error}")]
            except exceptions.FirebaseError as error:
                return [_classify(batch[0].token, error)]
            return [PushResult(batch[0].token, "sent", message_id=str(message_id))]
        try:
            built = [_build_message(m) for m in batch]
            response: Any = messaging.send_each(built, app=self._app)
        except ValueError as error:
            # firebase-admin validates the whole list before sending anything; isolate the
            # offending message(s) so the valid ones still go out.
            if len(batch) == 1:
                return [PushResult(batch[0].token, "failed", error=f"ValueError: {error}")]
            return [self._send_batch([m])[0] for m in batch]
        except exceptions.FirebaseError as error:
            # e.g. token refresh failed: every request in the batch shares that fate.
            return [_classify(m.token, error) for m in batch]
        results: list[PushResult] = []
        for message, item in zip(batch, response.responses, strict=True):
            if item.success:
                results.append(PushResult(message.token, "sent", message_id=item.message_id))
            else:
                results.append(_classify(message.token, item.exception))
        return results

    def close(self) -> None:
        """Delete the firebase App (closes its HTTP sessions).  Idempotent."""
        app, self._app = self._app, None
        if app is not None:
            with contextlib.suppress(ValueError):  # already deleted elsewhere
                firebase_admin.delete_app(app)

    def __enter__(self) -> FcmSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class OutboxSender:
    """Appends messages to a JSONL file instead of sending them (development, tests, audits).

    Each ``send`` takes an exclusive ``fcntl.flock`` on the file, appends all lines of the
    batch with ``O_APPEND`` and fsyncs before unlocking, so concurrent writers (threads or
    processes) never interleave or tear lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def worst_case_seconds(self, count: int) -> float:
        return 5.0  # a lock, a write and an fsync of a local file

    def send(self, messages: Sequence[PushMessage]) -> list[PushResult]:
        if not messages:
            return []
        sent_at = datetime.now(UTC).isoformat()
        lines = [
            json.dumps(
                {
                    "token": m.token,
                    "title": m.title,
                    "body": m.body,
                    "data": dict(m.data),
                    "sent_at": sent_at,
                },
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for m in messages
        ]
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                view = memoryview(payload)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return [PushResult(m.token, "sent", message_id=f"outbox:{uuid.uuid4()}") for m in messages]
