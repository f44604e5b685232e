"""Keyed, cancellable deadlines on the monotonic clock.

One entry per live key: arming a key again replaces its deadline, cancelling forgets
it, so a lease renewed ten thousand times or an allocation released early leaves
nothing behind. Deadlines are given in wall time (what users see, e.g.
`lease_expire_time`) and kept as an offset on the monotonic clock taken when armed, so
a step of the wall clock moves no deadline.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Literal

from rmgrpc.clock import Clock

# "rstart"/"rend": a reservation's window begins / ends.
TimerKind = Literal["lease", "max", "grace", "node", "rstart", "rend"]
TimerKey = tuple[TimerKind, str]


class Timers:
    def __init__(self, clock: Clock, on_earlier: Callable[[], None] = lambda: None) -> None:
        self._clock = clock
        # Called when a new deadline is the earliest: the timer loop sleeps until then.
        self._on_earlier = on_earlier
        self._live: dict[TimerKey, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._seq = 0

    def __len__(self) -> int:
        """Live deadlines (armed and neither fired nor cancelled)."""
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    @property
    def heap_size(self) -> int:
        """Entries held, replaced ones included until swept: bounded by 2x live + 64."""
        return len(self._heap)

    def arm(self, kind: TimerKind, object_id: str, wall_when: float) -> None:
        """(Re)sets the deadline of (kind, object_id) to the wall time `wall_when`."""
        when = self._clock.monotonic() + (wall_when - self._clock.now())
        self._seq += 1
        key: TimerKey = (kind, object_id)
        first = self._heap[0][0] if self._heap else None
        self._live[key] = (when, self._seq)
        heapq.heappush(self._heap, (when, self._seq, key))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._sweep()
        if first is None or when < first:
            self._on_earlier()

    def cancel(self, kind: TimerKind, object_id: str) -> None:
        self._live.pop((kind, object_id), None)

    def cancel_all(self, object_id: str, kinds: tuple[TimerKind, ...]) -> None:
        for kind in kinds:
            self._live.pop((kind, object_id), None)

    def due(self) -> list[TimerKey]:
        """Pops every live deadline that has come, in deadline order."""
        now = self._clock.monotonic()
        out: list[TimerKey] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, seq, key = heapq.heappop(heap)
            if self._live.get(key) == (when, seq):
                del self._live[key]
                out.append(key)
        return out

    def next_delay(self) -> float | None:
        """Seconds until the earliest live deadline (0 when overdue), None when none."""
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != (heap[0][0], heap[0][1]):
            heapq.heappop(heap)  # replaced or cancelled
        if not heap:
            return None
        return max(0.0, heap[0][0] - self._clock.monotonic())

    def _sweep(self) -> None:
        self._heap = [(when, seq, key) for key, (when, seq) in self._live.items()]
        heapq.heapify(self._heap)
