"""Time, injectable: the server reads the system clocks; tests move a manual one.

Two readings, for two jobs: `now()` is wall time, what timestamps show and what is
stored; `monotonic()` only ever moves forward and is what deadlines are kept on, so a
step of the wall clock (NTP, an operator) never expires leases en masse.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that only moves when told to; both readings move together.

    `step()` moves only the wall clock, as NTP or an operator would.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._mono = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds

    def step(self, seconds: float) -> None:
        self._now += seconds
