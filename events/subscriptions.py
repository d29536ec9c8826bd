"""Who consumes what: one subscription per event-driven function, and how failures retry.

This table is the one place the routing lives; the RabbitMQ topology, the in-process bus and
the Knative Triggers (knative/) all follow it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloudevents.http import CloudEvent

from events.catalog import DOCUMENT_REJECTED, DOCUMENT_STORED, DOCUMENT_UPLOADED
from events.cloudevent import MalformedEvent

Handler = Callable[[CloudEvent], None]
# The longest a server's hint (Retry-After) may hold an event back before its next attempt.
MAX_HINTED_DELAY = 3600.0
# Several events in one call, each with its own outcome (None: handled; an exception: that
# event alone is retried or dead-lettered), as AWS Powertools' batch processing reports
# partial failures. The handler's database round trips are then shared by the batch.
BatchHandler = Callable[[Sequence[CloudEvent]], list[BaseException | None]]

ROUTES: dict[str, tuple[str, ...]] = {
    "storage": (DOCUMENT_UPLOADED,),
    "notification": (DOCUMENT_STORED, DOCUMENT_REJECTED),
}


@dataclass(frozen=True)
class Subscription:
    name: str
    handler: Handler
    batch: BatchHandler | None = None

    @property
    def types(self) -> tuple[str, ...]:
        return ROUTES[self.name]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff delays between attempts; after the last one the event is dead-lettered."""

    delays: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def delay_after(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to dead-letter now. An
        error carrying ``retry_after`` (a server's Retry-After) waits at least that long."""
        if isinstance(error, MalformedEvent) or attempt > len(self.delays):
            return None
        hint = getattr(error, "retry_after", None)
        base = self.delays[attempt - 1]
        if not isinstance(hint, int | float) or hint != hint:  # NaN is no hint
            return base
        return max(base, min(float(hint), MAX_HINTED_DELAY))

    def queue_delay(self, delay: float) -> float:
        """The configured delay (one RabbitMQ holding queue each) that honours ``delay``."""
        return min((d for d in self.delays if d >= delay), default=max(self.delays))


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text[:1000]
