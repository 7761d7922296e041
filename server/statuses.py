"""Every way a call can end, as the one status a client sees; shared by the servicer and the token check.

The rule (see the status table in deploy/README): an outage is UNAVAILABLE with a retry hint, a bad or
missing credential UNAUTHENTICATED, a bad value INVALID_ARGUMENT, a refusal of the round's rules its own
code (``Refusal``), and anything unexpected is logged and answered INTERNAL, which the client library does
not retry. gRPC answers UNKNOWN for an exception that escapes a handler; nothing escapes here.

Only connectivity counts as an outage: ``StoreUnavailable`` (and a ``Refusal`` the coordinator made of one)
is UNAVAILABLE; every other ``StoreError`` (a constraint, a schema or programming error) is INTERNAL, so a
client never retries for ever against a fault that waiting will not fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from fedrecon.protocol import retry_after_metadata
from fedrecon.server.refusals import Refusal, Status
from fedrecon.server.store import StoreError, StoreUnavailable, UnknownCredential
from fedrecon.tensors import TensorDecodeError

log = logging.getLogger(__name__)
MAX_DETAILS_CHARS = 500  # refusal messages may quote client input; never echo a whole one back


@dataclass(frozen=True)
class CallStatus:
    """How a call ends: ``code``, a message for people, and trailing metadata (a retry hint)."""

    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str], ...] = ()

    @classmethod
    def retry_later(cls, code: grpc.StatusCode, details: str, retry_hint_ms: int) -> CallStatus:
        return cls(code, details, retry_after_metadata(retry_hint_ms))


class Unauthenticated(Exception):
    """The transport did not prove who the caller is (a token or certificate the identity needs)."""


class StreamRefused(Exception):
    """The servicer ends a stream itself (no slot, a time budget spent); ``status`` says how."""

    def __init__(self, status: CallStatus) -> None:
        super().__init__(status.details)
        self.status = status


def status_of(err: BaseException, *, retry_hint_ms: int) -> CallStatus:
    """The status ``err`` stands for. Unexpected errors are logged here (with their traceback) and never
    echoed: their text may hold internals."""
    if isinstance(err, StreamRefused):
        return err.status
    if isinstance(err, Refusal):
        details = _capped(err.message)
        if err.status == Status.UNAVAILABLE:
            return CallStatus.retry_later(grpc.StatusCode.UNAVAILABLE, details, retry_hint_ms)
        return CallStatus(getattr(grpc.StatusCode, err.status.value), details)
    if isinstance(err, TensorDecodeError):
        return CallStatus(grpc.StatusCode.INVALID_ARGUMENT, _capped(str(err)))
    if isinstance(err, (Unauthenticated, UnknownCredential)):
        return CallStatus(grpc.StatusCode.UNAUTHENTICATED, "a valid client credential is required")
    if isinstance(err, StoreUnavailable):
        return CallStatus.retry_later(grpc.StatusCode.UNAVAILABLE,
                                      "the coordinator's store is unavailable; retry later", retry_hint_ms)
    if isinstance(err, StoreError):
        log.error("store fault while serving a call", exc_info=err)
        return CallStatus(grpc.StatusCode.INTERNAL, "internal error in the coordinator's store")
    log.error("internal error while serving a call", exc_info=err)
    return CallStatus(grpc.StatusCode.INTERNAL, "internal error in the coordinator")


def _capped(text: str) -> str:
    return text if len(text) <= MAX_DETAILS_CHARS else text[:MAX_DETAILS_CHARS] + "..."
