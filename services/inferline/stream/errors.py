"""Errors of a stream worker: bad options (found before any work) and failures while running."""

from __future__ import annotations


class StreamError(Exception):
    """A stream worker could not start or had to stop."""


class StreamInputError(StreamError):
    """Bad options or an unusable config, found before any event is read (CLI exit 2)."""


class StreamUnavailable(StreamError):
    """The stream engine did not answer (down, timing out): the event is left pending and
    retried, and the failure is not counted as one of its attempts."""
