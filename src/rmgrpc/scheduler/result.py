"""A pass's decisions in the form the engine applies: small whatever the queue's depth.

`Decisions.pending` holds a `PendingStatus` per pending request; with tens of thousands
waiting, building, copying or pickling those objects costs more than the event loop can
spend between two RPCs. The engine needs less: each request's position (status, served
by Get/List) and the reasons that *changed* (state: each change is an event). So a pass
is summed up, where it ran, as a `PassResult`: the plan without its statuses, a
position per pending id (a plain `dict[str, int]`, cheap to move between processes), and
only the reasons that differ from what the same summariser said last time; and, every
so often rather than every pass, start-time estimates (`scheduler.estimate`, status).

Pure: no I/O. A `Summariser` remembers the reasons it gave, so it belongs to one runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rmgrpc.scheduler.estimate import estimate_starts
from rmgrpc.scheduler.snapshot import Decisions, Snapshot


@dataclass(frozen=True, slots=True)
class EstimatePolicy:
    """How start-time estimates are made (`scheduler.estimate`); depth 0: never."""

    depth: int = 0
    # Seconds of snapshot time between two estimates.
    every: float = 0.0
    resolution: float = 0.0


@dataclass(slots=True)
class PassResult:
    # Admissions, preemptions, holds and reservations; `pending` left empty.
    plan: Decisions = field(default_factory=Decisions)
    # 1-based position in admission order of every request still pending.
    positions: dict[str, int] = field(default_factory=dict)
    # Reasons new or changed since the summariser's previous result.
    reasons: dict[str, str] = field(default_factory=dict)
    # Seconds the pure core took.
    seconds: float = 0.0
    # Start-time estimates of pending requests, (start time or None, reason) by id, when
    # this pass made them (None: keep the last ones; they are made only every so often).
    estimates: dict[str, tuple[float | None, str]] | None = None

    @property
    def pending(self) -> int:
        return len(self.positions)


class Summariser:
    """Turns `Decisions` into `PassResult`s, each naming only the reasons that changed."""

    def __init__(self, estimates: EstimatePolicy | None = None) -> None:
        self._reasons: dict[str, str] = {}
        self.estimates = estimates or EstimatePolicy()
        self._estimated_at: float | None = None
        self._estimated: set[str] = set()

    def estimate_due(self, decisions: Decisions, now: float) -> bool:
        """Every `every` seconds; sooner (after a tenth of it) when requests wait within
        the first `depth` of the queue that the last estimates did not cover, so new work
        gets its estimate soon."""
        policy = self.estimates
        last = self._estimated_at
        if policy.depth <= 0 or not decisions.pending:
            return False
        if last is None or not 0 <= now - last < policy.every:
            return True
        # Only newcomers the estimate would cover: arrivals behind the first `depth` would
        # only be told "not estimated", not worth a replay of the queue.
        new = any(
            st.position <= policy.depth and aid not in self._estimated
            for aid, st in decisions.pending.items()
        )
        return new and now - last >= policy.every / 10

    def estimate(
        self, snapshot: Snapshot, decisions: Decisions
    ) -> dict[str, tuple[float | None, str]]:
        """Start-time estimates from the pass `decisions` made on `snapshot` (call when
        `estimate_due`; safe in another thread than the next passes' summaries)."""
        policy = self.estimates
        self._estimated_at = snapshot.now
        made = estimate_starts(snapshot, decisions, policy.depth, policy.resolution)
        estimates = {aid: (e.start_time, e.reason) for aid, e in made.items()}
        self._estimated = set(estimates)
        return estimates

    def forget(self) -> None:
        """The next result names every reason (the receiver lost track of them)."""
        self._reasons = {}
        self._estimated_at = None

    def __call__(
        self, decisions: Decisions, seconds: float = 0.0, snapshot: Snapshot | None = None
    ) -> PassResult:
        """`snapshot` is the one the pass ran on: estimates are made from it when due."""
        estimates = None
        if snapshot is not None and self.estimate_due(decisions, snapshot.now):
            estimates = self.estimate(snapshot, decisions)
        last = self._reasons
        reasons = {aid: st.reason for aid, st in decisions.pending.items()}
        changed = {aid: r for aid, r in reasons.items() if last.get(aid) != r}
        positions = {aid: st.position for aid, st in decisions.pending.items()}
        self._reasons = reasons
        plan = dataclasses.replace(decisions, pending={})
        return PassResult(
            plan=plan, positions=positions, reasons=changed, seconds=seconds, estimates=estimates
        )
