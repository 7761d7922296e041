"""A clock that moves only when told, for driving a ``Coordinator``'s deadlines by hand (tests, replays).

The coordinator takes any ``() -> float`` seconds clock; the real one is ``time.time``.
"""

from __future__ import annotations


class ManualClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
