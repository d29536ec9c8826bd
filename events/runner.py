"""The RabbitMQ subscriber runner: feeds one function's queue to its handler.

pika's BlockingConnection is single-threaded, so handlers run on a small thread pool and
hand their outcome back to the connection thread (``add_callback_threadsafe``), where the
message is acked, or re-published to a delay queue (retry with backoff) or to the
dead-letter queue, each publish confirmed by the broker before the original is acked. A
crash at any point leaves the message unacked, so the broker redelivers it: delivery is at
least once and handlers are idempotent. A wait longer than the longest delay queue (a
server's Retry-After) is made of several rounds of it (``DUE_HEADER``).

Messages that arrive while every handler thread is busy wait in the process (the prefetch
allows ``concurrency * batch_size``), and a thread that frees up takes up to ``batch_size``
of them at once: a subscription with a batch handler then shares its database round trips
among them. Nothing waits for a batch to fill: a quiet queue hands each message over alone,
and only a backlog, where throughput is what counts, makes batches. Each message is still
settled on its own, by its own outcome.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pika
from cloudevents.http import CloudEvent
from pika.exceptions import AMQPConnectionError, AMQPError

from events import amqp_codec, topology
from events.cloudevent import handling
from events.publisher import amqp_parameters
from events.subscriptions import MAX_HINTED_DELAY, RetryPolicy, Subscription, describe
from shared.observability import DEAD_LETTERS, HANDLED, RETRIES

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-docproc-attempt"
ERROR_HEADER = "x-docproc-last-error"
DEAD_REASON_HEADER = "x-docproc-dead-letter-reason"
# When a failure asks for a longer wait than the longest holding queue (FCM's Retry-After, a
# delivery lease still held), the event carries the time it is due, in milliseconds since
# the epoch (AMQP tables carry no floats). Back early, it goes to a holding queue again
# without reaching its handler or spending an attempt: otherwise the wait would be cut
# short, and the attempts run out while the other side still says "not yet".
DUE_HEADER = "x-docproc-due-ms"
RECONNECT_DELAY = 2.0
# How soon the consume loop notices stop() when no message arrives.
STOP_CHECK_SECONDS = 0.2


@dataclass(frozen=True)
class _Message:
    tag: int
    props: pika.BasicProperties
    body: bytes


class _NotYetDue(Exception):
    """The outcome of a message that came back before it was due: held again, unhandled."""

    def __init__(self, due: float) -> None:
        super().__init__(f"due at {due:.3f}")
        self.due = due


def _due(props: pika.BasicProperties) -> float | None:
    """When the message is due, in seconds since the epoch; None: at once. A due time
    further off than any hint may hold an event (another host's clock, a header gone
    wrong) is not believed: the event would go round the holding queues for ever."""
    value = (props.headers or {}).get(DUE_HEADER)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    due = value / 1000
    return due if due <= time.time() + MAX_HINTED_DELAY else None


@dataclass
class _Inbox:
    """Messages delivered on one connection and not yet taken by a handler thread."""

    waiting: deque[_Message] = field(default_factory=deque)
    takers: int = 0  # threads taking from it; at most the runner's concurrency
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set when its connection is gone: what waits can no longer be acked, and the broker
    # hands it out again (perhaps at once, to another worker), so nothing more is taken.
    closed: bool = False


class RabbitRunner:
    def __init__(
        self,
        url: str,
        prefix: str,
        subscription: Subscription,
        policy: RetryPolicy,
        concurrency: int = 4,
        batch_size: int = 1,
    ) -> None:
        self.params = amqp_parameters(url)
        self.prefix = prefix
        self.sub = subscription
        self.policy = policy
        self.concurrency = concurrency
        # Without a batch handler a thread takes one message at a time whatever is set.
        self.batch_size = batch_size if subscription.batch is not None else 1
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._inbox = _Inbox()

    def stop(self) -> None:
        self._stop.set()

    def waiting(self) -> int:
        """Messages delivered to this process and waiting for a free handler thread."""
        with self._inbox.lock:
            return len(self._inbox.waiting)

    def run(self) -> None:
        """Consume until ``stop()``; reconnects after broker outages."""
        while not self._stop.is_set():
            try:
                self._consume()
            except (AMQPConnectionError, AMQPError, OSError) as exc:
                self.ready.clear()
                if self._stop.is_set():
                    break
                log.warning("%s: broker connection lost (%s); reconnecting", self.sub.name, exc)
                self._stop.wait(RECONNECT_DELAY)

    def _consume(self) -> None:
        conn = pika.BlockingConnection(self.params)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"{self.sub.name}-handler")
        try:
            chan = conn.channel()
            chan.confirm_delivery()
            topology.declare(chan, self.prefix, self.policy.delays)
            chan.basic_qos(prefetch_count=self.concurrency * self.batch_size)
            # What waited on a lost connection is redelivered: start from an empty inbox.
            self._inbox = _Inbox()
            on_message = functools.partial(self._on_message, conn, pool, self._inbox)
            chan.basic_consume(topology.queue(self.prefix, self.sub.name), on_message)
            self.ready.set()
            log.info("%s: consuming %s", self.sub.name, topology.queue(self.prefix, self.sub.name))
            # The loop waits without a time limit, which would cost a timer set and cancelled
            # on every pass (one per frame and ack under load); a timer of its own makes it
            # look at the stop flag every STOP_CHECK_SECONDS. stop() only sets the flag: it
            # may run in a signal handler on this very thread, inside pika.
            self._check_stop(conn)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=None)
        finally:
            self.ready.clear()
            # Unacked messages go back to the queue when the connection closes: the handler
            # threads finish what they hold and take nothing more.
            with self._inbox.lock:
                self._inbox.closed = True
            pool.shutdown(wait=True, cancel_futures=True)
            if conn.is_open:
                with contextlib.suppress(AMQPError):
                    conn.close()

    def _check_stop(self, conn: pika.BlockingConnection) -> None:
        if not self._stop.is_set():
            conn.call_later(STOP_CHECK_SECONDS, functools.partial(self._check_stop, conn))

    def _on_message(
        self,
        conn: pika.BlockingConnection,
        pool: ThreadPoolExecutor,
        inbox: _Inbox,
        chan: Any,
        method: Any,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        with inbox.lock:
            inbox.waiting.append(_Message(method.delivery_tag, props, body))
            if inbox.takers >= self.concurrency:
                return  # a busy thread takes it when it is done
            inbox.takers += 1
        pool.submit(self._take, conn, chan, inbox)

    def _take(self, conn: pika.BlockingConnection, chan: Any, inbox: _Inbox) -> None:
        """Handle what is waiting, up to a batch at a time, until nothing is."""
        while True:
            with inbox.lock:
                # Once stopping, or once the connection is gone, what still waits is left
                # unacked: the broker hands it out again, rather than this thread handling
                # it beside the worker that gets it next.
                if not inbox.waiting or inbox.closed or self._stop.is_set():
                    inbox.takers -= 1
                    return
                count = min(self.batch_size, len(inbox.waiting))
                batch = [inbox.waiting.popleft() for _ in range(count)]
            for message, error in zip(batch, self._handle(batch), strict=True):
                settle = functools.partial(self._settle, chan, message.tag, message.props,
                                           message.body, error)
                try:
                    conn.add_callback_threadsafe(settle)
                except (AMQPError, AttributeError, RuntimeError) as exc:
                    # The connection died while we worked; the broker will redeliver.
                    log.warning("%s: could not settle message %s: %s", self.sub.name,
                                message.props.message_id, exc)

    def _handle(self, batch: list[_Message]) -> list[BaseException | None]:
        """Each message's outcome: None when handled, else the error it failed with."""
        started = time.monotonic()
        outcomes: list[BaseException | None] = [None] * len(batch)
        events: list[CloudEvent] = []
        at: list[int] = []
        now = time.time()
        for i, message in enumerate(batch):
            due = _due(message.props)
            if due is not None and due > now:
                outcomes[i] = _NotYetDue(due)
                continue
            try:
                events.append(amqp_codec.decode(message.props, message.body))
                at.append(i)
            except Exception as exc:  # MalformedEvent above all: dead-lettered at once
                outcomes[i] = exc
        if len(events) > 1 and self.sub.batch is not None:
            try:
                results = self.sub.batch(events)
            except Exception as exc:  # the batch as a whole failed: each event is retried
                results = [exc] * len(events)
            for i, result in zip(at, results, strict=True):
                outcomes[i] = result
        else:
            for i, event in zip(at, events, strict=True):
                try:
                    with handling(event, self.sub.name):
                        self.sub.handler(event)
                except Exception as exc:
                    outcomes[i] = exc
        for message, error in zip(batch, outcomes, strict=True):
            if error is not None and not isinstance(error, _NotYetDue):
                log.warning("%s: handler failed for message %s: %s",
                            self.sub.name, message.props.message_id, describe(error))
        log.debug("%s: handled %d message(s) in %.3fs", self.sub.name, len(batch),
                  time.monotonic() - started)
        return outcomes

    def _settle(
        self,
        chan: Any,
        tag: int,
        props: pika.BasicProperties,
        body: bytes,
        error: BaseException | None,
    ) -> None:
        if not chan.is_open:
            return
        if error is None:
            chan.basic_ack(tag)
            HANDLED.labels(self.sub.name, "ok").inc()
            return
        headers = dict(props.headers or {})
        if isinstance(error, _NotYetDue):
            target = topology.retry_queue(self.prefix, self.sub.name,
                                          self.policy.queue_delay(error.due - time.time()))
            self._republish(chan, tag, props, body, headers, target)
            return
        HANDLED.labels(self.sub.name, "failed").inc()
        attempt = int(headers.get(ATTEMPT_HEADER, 1))
        delay = self.policy.delay_after(attempt, error)
        headers[ATTEMPT_HEADER] = attempt + 1
        headers[ERROR_HEADER] = describe(error)
        headers.pop(DUE_HEADER, None)
        if delay is None:
            headers[ATTEMPT_HEADER] = attempt
            headers[DEAD_REASON_HEADER] = describe(error)
            target = topology.dead_letter_queue(self.prefix, self.sub.name)
            DEAD_LETTERS.labels(self.sub.name).inc()
            log.error("%s: dead-lettering message %s after %d attempt(s): %s",
                      self.sub.name, props.message_id, attempt, describe(error))
        else:
            held = self.policy.queue_delay(delay)
            if delay > held:
                headers[DUE_HEADER] = int((time.time() + delay) * 1000)
            target = topology.retry_queue(self.prefix, self.sub.name, held)
            RETRIES.labels(self.sub.name).inc()
        self._republish(chan, tag, props, body, headers, target)

    def _republish(self, chan: Any, tag: int, props: pika.BasicProperties, body: bytes,
                   headers: dict[str, Any], target: str) -> None:
        new_props = pika.BasicProperties(
            content_type=props.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=props.message_id,
            type=props.type,
            headers=headers,
        )
        # Confirmed before the ack: a crash in between redelivers, never loses.
        chan.basic_publish("", target, body, new_props, mandatory=True)
        chan.basic_ack(tag)
