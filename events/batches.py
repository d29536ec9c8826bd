"""What every batch handler does around its shared round trips: one event per key in the
batch, the repeats handled on their own after it, and an outcome for each event."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cloudevents.http import CloudEvent

from events.cloudevent import MalformedEvent, handling

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Batch(Generic[T]):
    events: Sequence[CloudEvent]
    outcomes: list[BaseException | None]
    # The first event of each key: its place in the batch and what it was parsed into.
    first: dict[str, tuple[int, T]] = field(default_factory=dict)
    again: list[int] = field(default_factory=list)  # events repeating a key seen before

    def attempt(self, i: int, function: str, call: Callable[[], R]) -> R | None:
        """``call`` for event ``i``, in that event's log context; None, with the error as
        the event's outcome, when it raises."""
        with handling(self.events[i], function):
            try:
                return call()
            except Exception as exc:
                self.outcomes[i] = exc
                return None


def split(events: Sequence[CloudEvent],
          parse: Callable[[CloudEvent], tuple[str, T]]) -> Batch[T]:
    """Parse each event into its key and data; a malformed one gets its outcome at once."""
    batch: Batch[T] = Batch(events, [None] * len(events))
    for i, event in enumerate(events):
        try:
            key, value = parse(event)
        except MalformedEvent as exc:
            batch.outcomes[i] = exc
            continue
        if key in batch.first:
            batch.again.append(i)
        else:
            batch.first[key] = (i, value)
    return batch


def handle_repeats(batch: Batch[T], handler: Callable[[CloudEvent], None],
                   function: str) -> list[BaseException | None]:
    """Handle the repeats one by one (they see what the batch did), then every outcome."""
    for i in batch.again:
        batch.attempt(i, function, functools.partial(handler, batch.events[i]))
    return batch.outcomes
