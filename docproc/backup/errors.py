"""The exceptions of docproc.backup."""

from __future__ import annotations


class BackupError(Exception):
    """A backup could not be written, read, verified or restored."""


class RestoreRefused(BackupError):
    """The restore would overwrite data, or the target cannot read the backup; nothing was
    written."""
