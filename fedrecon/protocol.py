"""What both sides of the wire agree on, in one place: the protocol version, the retry hint, and the types
a round is described by (an assignment, a retry window, a report's outcome, a round's outcome).

The coordinator builds these; the servicer turns them into ``fedrecon.v1`` messages and the client library
turns the messages back into them, so neither an app nor the coordinator's rules ever handle generated
protobuf classes. Nothing here imports gRPC, protobuf or TensorFlow: an app can import it for free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

#: The ``fedrecon.v1`` contract. A client sends it on check-in; a coordinator refuses any other
#: (FAILED_PRECONDITION). A breaking change gets a new proto package and a new number.
PROTOCOL_VERSION = 1

# ----- the retry hint ----------------------------------------------------------------------------------
# Trailing metadata ``retry-after-ms`` on a refusal that means "not now, later": a store outage
# (UNAVAILABLE) or no free stream slot (RESOURCE_EXHAUSTED). The client library waits at least that long
# before trying again. An answer without it is final for that call (RESOURCE_EXHAUSTED without a hint is
# not retried), so a refusal such as a check-in rate limit is never hammered by automatic retries.
RETRY_AFTER_KEY = "retry-after-ms"
MAX_RETRY_AFTER_MS = 10 * 60 * 1000  # a hint is advice; no server may park a client for longer than this

# Ends every refusal caused by a credential's share (its assignments in a round, its check-in budget), so
# tools that run many users under one token can tell this from other refusals and say why.
CREDENTIAL_SHARE_HINT = "a token issued with --max-devices N has the share of N devices"


def retry_after_metadata(ms: int) -> tuple[tuple[str, str]]:
    """Trailing metadata asking the client to wait ``ms`` milliseconds before retrying."""
    return ((RETRY_AFTER_KEY, str(max(0, int(ms)))),)


def retry_after_ms(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The hint in ``metadata`` (capped at ``MAX_RETRY_AFTER_MS``), or None if absent or malformed."""
    for key, value in metadata or ():
        if key != RETRY_AFTER_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if text.isdigit() and len(text) <= 12:
            return min(int(text), MAX_RETRY_AFTER_MS)
        return None
    return None


# ----- a round, as both sides describe it ---------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """What a selected client must do in a round: train against ``model_version`` and report to
    ``round_id`` with ``token`` before ``deadline``."""

    task_name: str
    round_id: int
    round_num: int  # sequential within the task (failed rounds count too)
    model_version: int
    token: str  # proves on upload that this client was assigned to this round
    deadline: datetime
    model_spec_json: str
    training_config_json: str
    batch_size: int
    max_chunk_bytes: int = 0  # largest tensor chunk the coordinator accepts in a report (0: its default)
    # How the report's delta is to be encoded (``fedrecon.core.compression.UploadCodec``'s values).
    upload_codec: str = "none"
    # The round uses secure aggregation: the update is masked and sent through ``SecureAggregation``.
    secure_aggregation: bool = False


@dataclass(frozen=True)
class RetryLater:
    """Not selected now: check in again after a delay drawn uniformly in [delay_min_s, delay_max_s]."""

    delay_min_s: float
    delay_max_s: float
    reason: str


@dataclass(frozen=True)
class ReportOutcome:
    """What became of a report. The coordinator answers ``accepted`` (this call folded the update) or not
    (the very same update had already been accepted: an idempotent retry) with a message; a refusal is an
    error there. The client library fills in the rest: the round, the update's weight and metrics, and a
    refusal as ``status`` (ABORTED, UNAUTHENTICATED, ...) rather than an exception that loses the round."""

    accepted: bool
    message: str
    status: str = "OK"  # the gRPC status of the report: OK, or why it was refused
    round_id: int = 0
    round_num: int = 0
    model_version: int = 0  # the version the update was computed against
    weight: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)
    # The version the update went into, when known: a committed round's (GetRound), or the coordinator
    # said so when answering a retry.
    committed_version: int | None = None

    @property
    def in_round(self) -> bool:
        """The update is in the round's aggregate (by this call or an earlier identical attempt)."""
        return self.status == "OK"


@dataclass(frozen=True)
class LatestModel:
    """The newest committed version of a task and what a client needs to use it (``GetLatestModel``)."""

    model_version: int
    model_spec_json: str
    training_config_json: str
    batch_size: int
    item_ids: tuple[int, ...] = ()  # the task's item vocabulary (empty: item indices are the ids)


class RoundState(StrEnum):
    """A round as a client can ask about it (``GetRound``)."""

    OPEN = "open"  # still taking reports, or its commit is under way
    COMMITTED = "committed"  # wrote ``new_version``: every update it accepted is in that version
    FAILED = "failed"  # the model is unchanged: no update it accepted is in any version


@dataclass(frozen=True)
class RoundOutcome:
    """Where a round is (``Coordinator.round_outcome``, the ``GetRound`` call)."""

    round_id: int
    round_num: int
    state: RoundState
    new_version: int | None = None  # set when committed
    num_accepted: int = 0
    reason: str = ""  # why it failed (or why it committed: goal, all answered, deadline)
