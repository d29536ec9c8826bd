"""RabbitMQ names and declarations for the event exchange, function queues, retries, DLQs.

```
<prefix>.events            topic exchange; routing key = CloudEvent type
<prefix>.<fn>              durable quorum queue per function, bound by event type; a message
                           delivered more than DELIVERY_LIMIT times without an ack (its
                           consumer keeps dying on it) is dead-lettered by RabbitMQ itself
<prefix>.<fn>.retry.<ms>   holding queue per backoff delay, whose TTL is that delay; expired
                           messages dead-letter straight back to <prefix>.<fn>
<prefix>.<fn>.dlq          dead letters, with the reason and attempt count in headers
```
Declarations are idempotent; the publisher declares everything too, so an event published
before any worker started is queued rather than dropped.
"""

from __future__ import annotations

from typing import Any

from events.subscriptions import ROUTES


def exchange(prefix: str) -> str:
    return f"{prefix}.events"


def queue(prefix: str, fn: str) -> str:
    return f"{prefix}.{fn}"


def retry_queue(prefix: str, fn: str, delay: float) -> str:
    # Named by its delay: RabbitMQ refuses to redeclare a queue with another TTL, so a changed
    # backoff schedule makes new queues instead of failing at start.
    return f"{prefix}.{fn}.retry.{int(delay * 1000)}ms"


def dead_letter_queue(prefix: str, fn: str) -> str:
    return f"{prefix}.{fn}.dlq"


# Handler failures are retried and dead-lettered by the runner; this bounds the other kind,
# a message that crashes (or OOM-kills) every worker that takes it.
DELIVERY_LIMIT = 5


def declare(channel: Any, prefix: str, delays: tuple[float, ...]) -> None:
    channel.exchange_declare(exchange(prefix), exchange_type="topic", durable=True)
    for fn, types in ROUTES.items():
        main = queue(prefix, fn)
        channel.queue_declare(main, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_letter_queue(prefix, fn),
        })
        for event_type in types:
            channel.queue_bind(main, exchange(prefix), routing_key=event_type)
        for delay in delays:
            channel.queue_declare(
                retry_queue(prefix, fn, delay),
                durable=True,
                arguments={
                    "x-message-ttl": int(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": main,
                },
            )
        channel.queue_declare(dead_letter_queue(prefix, fn), durable=True)


def delete(channel: Any, prefix: str, delays: tuple[float, ...]) -> None:
    """Remove everything ``declare`` made (tests and uninstall)."""
    for fn in ROUTES:
        channel.queue_delete(queue(prefix, fn))
        for delay in delays:
            channel.queue_delete(retry_queue(prefix, fn, delay))
        channel.queue_delete(dead_letter_queue(prefix, fn))
    channel.exchange_delete(exchange(prefix))
