"""Errors of a batch job: what stops it before any work, and what stops it mid-way (resumable)."""

from __future__ import annotations


class BatchError(Exception):
    """Base of the errors that end a batch job; the message is meant for the operator."""


class BatchInputError(BatchError):
    """The input, the options or the output directory are unusable: found before any work starts."""


class OutputBusy(BatchInputError):
    """Another run (a process) holds the shard's output directory now; it may be free later."""


class BatchJobFailed(BatchError):
    """The job stopped part-way (a dependency stayed down past the retries); committed parts stay,
    and ``--resume`` continues from them."""


class BatchCancelled(BatchError):
    """A signal stopped the job; committed parts stay, and ``--resume`` continues from them."""
