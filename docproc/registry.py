"""The functions of docproc, by name: which serve HTTP and which consume events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from werkzeug.routing import Map
from werkzeug.wrappers import Request, Response

from docproc.runtime import Services
from events.subscriptions import Subscription
from functions.documents import main as documents
from functions.download import main as download
from functions.notification import main as notification
from functions.storage import main as storage
from functions.users import main as users


@dataclass(frozen=True)
class HttpFunction:
    name: str
    routes: Map
    handle: Callable[[Services, Request], Response]


HTTP_FUNCTIONS = (
    HttpFunction("documents", documents.ROUTES, documents.handle),
    HttpFunction("download", download.ROUTES, download.handle),
    HttpFunction("users", users.ROUTES, users.handle),
)

EVENT_FUNCTIONS: dict[str, Callable[[Services], Subscription]] = {
    "storage": storage.subscription,
    "notification": notification.subscription,
}
