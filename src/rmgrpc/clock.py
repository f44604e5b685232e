"""Time, injectable: the server reads the system clocks; tests move a manual one.

Two readings, for two jobs: `now()` is wall time, what timestamps show and what is
stored; `monotonic()` only ever moves forward and is what deadlines are kept on, so a
step of the wall clock (NTP, an operator) never expires leases en masse.
"""

from __future__ import annotations

import asyncio
import contextlib
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


async def set_or_timeout(event: asyncio.Event, timeout: float | None) -> None:
    """Until `event` is set or `timeout` seconds pass (None: no timeout).

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 it returns normally when
    the caller is cancelled just as the event is set, swallowing the cancellation, and a
    background loop waiting this way then never ends: the server's stop, which cancels
    and awaits it, hung (tests/unit/test_engine.py has the race)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
