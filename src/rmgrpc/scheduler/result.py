"""A pass's decisions in the form the engine applies: small whatever the queue's depth.

`Decisions.pending` holds a `PendingStatus` per pending request; with tens of thousands
waiting, building, copying or pickling those objects costs more than the event loop can
spend between two RPCs. The engine needs less: each request's position (status, served
by Get/List) and the reasons that *changed* (state: each change is an event). So a pass
is summed up, where it ran, as a `PassResult`: the plan without its statuses, a
position per pending id (a plain `dict[str, int]`, cheap to move between processes), and
only the reasons that differ from what the same summariser said last time.

Pure: no I/O. A `Summariser` remembers the reasons it gave, so it belongs to one runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rmgrpc.scheduler.snapshot import Decisions


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

    @property
    def pending(self) -> int:
        return len(self.positions)


class Summariser:
    """Turns `Decisions` into `PassResult`s, each naming only the reasons that changed."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def forget(self) -> None:
        """The next result names every reason (the receiver lost track of them)."""
        self._reasons = {}

    def __call__(self, decisions: Decisions, seconds: float = 0.0) -> PassResult:
        last = self._reasons
        reasons = {aid: st.reason for aid, st in decisions.pending.items()}
        changed = {aid: r for aid, r in reasons.items() if last.get(aid) != r}
        positions = {aid: st.position for aid, st in decisions.pending.items()}
        self._reasons = reasons
        plan = dataclasses.replace(decisions, pending={})
        return PassResult(plan=plan, positions=positions, reasons=changed, seconds=seconds)
