"""The retry hint both sides of the wire agree on: trailing metadata ``retry-after-ms`` on a refusal.

The coordinator attaches it to answers that mean "not now, later" (a store outage: UNAVAILABLE; no free
stream slot: RESOURCE_EXHAUSTED), and the client library waits at least that long before trying again. An
answer without it is final for that call (the library does not retry RESOURCE_EXHAUSTED without a hint),
so a refusal such as a check-in rate limit is never hammered by automatic retries.
"""

from __future__ import annotations

from collections.abc import Iterable

RETRY_AFTER_KEY = "retry-after-ms"
MAX_RETRY_AFTER_MS = 10 * 60 * 1000  # a hint is advice; no server may park a client for longer than this


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
