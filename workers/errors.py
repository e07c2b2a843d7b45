"""Exceptions a job handler raises to end its job in a known way."""

from typing import Any


class JobFailed(Exception):
    """The job cannot succeed for a reason the user should read (bad model, bad data)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class JobCancelled(Exception):
    """The user cancelled the job; raised at a progress point."""


class AttemptSuperseded(Exception):
    """This attempt at the job was taken back (its worker looked lost) and the job was queued
    again or failed: this run must stop and write nothing more; raised at a progress point."""
