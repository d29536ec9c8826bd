"""The callback through which the backup operations report their steps."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def noop(message: str) -> None:
    pass
