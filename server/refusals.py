"""Why the coordinator says no, in domain terms the transport maps to gRPC status codes.

The coordinator never imports gRPC: it raises ``Refusal`` with a ``Status`` named after the gRPC code it
stands for and a short machine-readable ``reason`` (counted per round and shown by ``fedrecon status``),
and the servicer turns it into ``context.abort(code, message)``.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    ABORTED = "ABORTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class Refusal(Exception):
    """A request the coordinator refuses; nothing it holds has changed."""

    def __init__(self, status: Status, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.reason!r}, {self.message!r})"
