"""How long a failed event waits before its next attempt (events/subscriptions.py)."""

from __future__ import annotations

import pytest

from events.cloudevent import MalformedEvent
from events.subscriptions import MAX_HINTED_DELAY, RetryPolicy

POLICY = RetryPolicy((1.0, 5.0, 30.0))


class Throttled(Exception):
    def __init__(self, retry_after: float | None) -> None:
        super().__init__("try later")
        self.retry_after = retry_after


@pytest.mark.parametrize(
    ("attempt", "error", "delay"),
    [
        (1, RuntimeError("boom"), 1.0),
        (3, RuntimeError("boom"), 30.0),
        (4, RuntimeError("boom"), None),  # attempts spent: dead-lettered
        (1, MalformedEvent("no id"), None),  # can never succeed: dead-lettered at once
        (1, Throttled(12.5), 12.5),  # the server's hint, when longer than the backoff
        (3, Throttled(2.0), 30.0),  # the backoff, when longer than the hint
        (1, Throttled(None), 1.0),
        (1, Throttled(float("nan")), 1.0),  # no hint at all
        (1, Throttled(10 * 24 * 3600), MAX_HINTED_DELAY),  # a day's wait is capped
    ],
)
def test_delay_after_a_failure(attempt: int, error: BaseException, delay: float | None) -> None:
    assert POLICY.delay_after(attempt, error) == delay


def test_a_due_time_beyond_any_hint_is_not_believed() -> None:
    """A message carrying a due time further off than a hint may hold it (another host's
    clock, a header gone wrong) would go round the holding queues for ever."""
    import time

    import pika

    from events.runner import DUE_HEADER, _due

    def due_in(seconds: float) -> float | None:
        ms = int((time.time() + seconds) * 1000)
        return _due(pika.BasicProperties(headers={DUE_HEADER: ms}))

    assert due_in(300) is not None
    assert due_in(MAX_HINTED_DELAY + 60) is None
    assert _due(pika.BasicProperties(headers={DUE_HEADER: True})) is None


def test_the_holding_queue_for_a_delay_is_the_shortest_that_covers_it() -> None:
    assert [POLICY.queue_delay(d) for d in (0.5, 1.0, 4.0, 30.0)] == [1.0, 1.0, 5.0, 30.0]
    # Longer than every queue: the longest, and the runner sends the event round again
    # until it is due (events/runner.py, DUE_HEADER).
    assert POLICY.queue_delay(300.0) == 30.0
