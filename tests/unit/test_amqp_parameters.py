"""Connections to RabbitMQ give up on a broker that blocks publishers (events/publisher.py)."""

from __future__ import annotations

from events.publisher import BLOCKED_CONNECTION_TIMEOUT, AmqpPublisher, amqp_parameters
from events.runner import RabbitRunner
from events.subscriptions import RetryPolicy, Subscription

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def test_a_blocked_connection_fails_after_a_while_instead_of_waiting_for_ever() -> None:
    # pika's own default is None: under a memory or disk alarm a confirmed publish would
    # hold the process's channel, and every upload behind it, until the alarm clears.
    assert amqp_parameters(URL).blocked_connection_timeout == BLOCKED_CONNECTION_TIMEOUT
    assert AmqpPublisher(URL, "p", (1.0,)).params.blocked_connection_timeout == (
        BLOCKED_CONNECTION_TIMEOUT)
    runner = RabbitRunner(URL, "p", Subscription("storage", lambda _: None), RetryPolicy())
    assert runner.params.blocked_connection_timeout == BLOCKED_CONNECTION_TIMEOUT


def test_the_url_may_set_its_own_limit() -> None:
    params = amqp_parameters(URL + "?blocked_connection_timeout=3&heartbeat=30")
    assert (params.blocked_connection_timeout, params.heartbeat) == (3.0, 30)
