"""Counted slots, refused rather than queued: how many streams are open, in all and per caller group.

Used only from the server's event loop, so no lock: ``take`` and ``give_back`` never run concurrently.
"""

from __future__ import annotations

from collections import Counter


class Slots:
    """At most ``capacity`` holders per key (None: no limit). Keys with no holder are forgotten, so memory
    follows the callers that hold something now, not every caller ever seen."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._held: Counter[str] = Counter()

    def take(self, key: str = "") -> bool:
        """Take a slot under ``key``; False (and nothing taken) if its ``capacity`` are all held."""
        if self.capacity is not None and self._held[key] >= self.capacity:
            return False
        self._held[key] += 1
        return True

    def give_back(self, key: str = "") -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]

    def held(self, key: str = "") -> int:
        return self._held.get(key, 0)
