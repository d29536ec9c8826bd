"""The exception every rejection of shared.inspection raises."""

from __future__ import annotations


class InvalidDocument(Exception):
    """The bytes are not a usable document of their type; the message is the reason shown."""
