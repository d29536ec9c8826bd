"""Publishing events: to RabbitMQ with publisher confirms, or to a Knative sink over HTTP.

Both raise ``PublishError`` when an event cannot be handed over durably, so the caller
leaves it in its record's outbox for the relay (docproc/outbox.py) rather than taking it as
sent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Protocol

import pika
import requests
from cloudevents.http import CloudEvent
from pika.exceptions import AMQPError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from events import amqp_codec, http_codec, topology
from events.cloudevent import summary

log = logging.getLogger(__name__)


# How long a publish may wait while RabbitMQ blocks publishers (a memory or disk alarm)
# before it fails and the event is left to the outbox: pika waits for ever by default, and
# a publish holding the process's channel would hold every upload behind it.
BLOCKED_CONNECTION_TIMEOUT = 10.0


class PublishError(Exception):
    """The event was not confirmed by the broker or the sink."""


def amqp_parameters(url: str) -> pika.URLParameters:
    """The connection parameters for ``url``, with a limit on waiting while blocked unless
    the URL sets one (``?blocked_connection_timeout=``)."""
    params = pika.URLParameters(url)
    if params.blocked_connection_timeout is None:
        params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT
    return params


class Publisher(Protocol):
    def publish(self, event: CloudEvent) -> None: ...
    def close(self) -> None: ...


class _Transient(Exception):
    pass


class AmqpPublisher:
    """One confirmed channel shared by the threads of a process (pika is not thread-safe,
    hence the lock); reconnects once per publish when the connection has gone away."""

    def __init__(self, url: str, prefix: str, delays: tuple[float, ...]) -> None:
        self.params = amqp_parameters(url)
        self.prefix = prefix
        self.delays = delays
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._chan: pika.adapters.blocking_connection.BlockingChannel | None = None

    def _channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        if self._chan is None or not self._chan.is_open:
            self._drop()
            self._conn = pika.BlockingConnection(self.params)
            chan = self._conn.channel()
            chan.confirm_delivery()
            topology.declare(chan, self.prefix, self.delays)
            self._chan = chan
        return self._chan

    def _drop(self) -> None:
        if self._conn is not None and self._conn.is_open:
            with contextlib.suppress(AMQPError):
                self._conn.close()
        self._conn = None
        self._chan = None

    def publish(self, event: CloudEvent) -> None:
        props, body = amqp_codec.encode(event)
        try:
            self._publish(props, body, str(event["type"]))
        except (_Transient, AMQPError, OSError) as exc:
            raise PublishError(f"broker did not confirm event {event['id']}: {exc}") from exc
        log.debug("published %s", summary(event))

    @retry(
        retry=retry_if_exception_type((_Transient, AMQPError, OSError)),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )
    def _publish(self, props: pika.BasicProperties, body: bytes, routing_key: str) -> None:
        with self._lock:
            try:
                # mandatory: an event no queue is bound for is an error, not a silent drop
                self._channel().basic_publish(
                    topology.exchange(self.prefix), routing_key, body, props, mandatory=True
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise _Transient(str(exc)) from exc
            except (AMQPError, OSError):
                self._drop()
                raise

    def close(self) -> None:
        with self._lock:
            self._drop()


class HttpSinkPublisher:
    """Knative delivery: POST the event (binary mode) to K_SINK, the broker's ingress."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self.session = requests.Session()

    def publish(self, event: CloudEvent) -> None:
        headers, body = http_codec.encode(event)
        try:
            self._post(headers, body)
        except (_Transient, requests.RequestException) as exc:
            raise PublishError(f"sink did not accept event {event['id']}: {exc}") from exc

    @retry(
        retry=retry_if_exception_type((_Transient, requests.ConnectionError, requests.Timeout)),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )
    def _post(self, headers: dict[str, str], body: bytes) -> None:
        resp = self.session.post(self.url, headers=headers, data=body, timeout=self.timeout)
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Transient(f"HTTP {resp.status_code}")
        if resp.status_code >= 300:
            raise PublishError(f"sink refused the event: HTTP {resp.status_code} {resp.text[:200]}")

    def close(self) -> None:
        self.session.close()
