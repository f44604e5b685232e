"""Start-time estimates for pending work: when will it run, and on what does that rest?

Slurm's `squeue --start` answers from the time limits of running jobs; so does this: a
pure simulation over a snapshot and the decisions of the pass that ran on it.

- What holds capacity (and what the pass just placed or preempted) gives it back at its
  *hard end*: `max_end_time` (placed time + `max_duration_seconds`), or for a preempted
  victim the end of its grace. Work without a hard end never gives it back.
- At each hard end, earliest first, a pass is replayed over the waiting requests with
  the core's own rules: preemptors first, then the hierarchical fair order
  (`fairshare.FairQueue`, with fair shares recomputed from the demand left), quota and
  lending limits (`fairshare.Ledger`), placement by the filter chain and best fit on a
  view indexed as a fresh pass's is (`placement.CapacityView`), gangs whole, smaller
  requests passing a blocked larger one, nodes held for starving gangs at their turn
  (with the conservative backfill the pass allows on them).
  A request placed there starts then, and holds its capacity until its own hard end.
- Reservations as a pass sees them (`reservations.Reserved`, made afresh each round):
  their idle capacity is kept from the queue but for backfill ending by their start;
  work naming one is placed inside it once its window begins and leaves when it ends;
  work still waiting when its window ends is rejected. Window starts and ends are
  points on the timeline beside the hard ends.
- What is still waiting when no hard end is left is "unknown", with the reason.

It assumes no new arrivals, no early releases and no preemption after this pass, and
usage decay (the fair-share half-life) frozen at the snapshot's time. Under those
assumptions the replay makes the decisions the passes will, so the estimate is never
later than the real start (tested as a property); work released early only brings the
real start forward.

Bounded: only the first `limit` requests in queue order are simulated (the rest get
"not estimated"), an end that frees too little for any of them costs one check per kind
of request, and the engine asks for estimates only every so often, not every pass.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from rmgrpc.cost import BudgetLeft, PriceTable, budget_block
from rmgrpc.model import Allocation, AllocationState, Placement, Shape
from rmgrpc.scheduler.cycle import frees_at, hard_end, queue_key
from rmgrpc.scheduler.fairshare import Amount, FairQueue, Ledger, fair_shares
from rmgrpc.scheduler.placement import (
    CapacityView,
    Held,
    NodeCapacity,
    Timeline,
    nodes_to_hold,
    replica_timeline,
    start_from,
)
from rmgrpc.scheduler.reservations import Reserved, live, may_backfill, when
from rmgrpc.scheduler.snapshot import Decisions, Snapshot

NO_HARD_END = (
    "unknown: work without a hard end (no max_duration_seconds) holds the capacity it needs"
)


@dataclass(frozen=True, slots=True)
class Estimate:
    # Earliest time the request can start (seconds since the epoch); None: unknown.
    start_time: float | None
    # What the estimate rests on, in words.
    reason: str


@dataclass(slots=True)
class _Running:
    alloc: Allocation
    end: float | None


class _Estimator:
    def __init__(
        self, snapshot: Snapshot, decisions: Decisions, limit: int, resolution: float
    ) -> None:
        self.now = now = snapshot.now
        self.resolution = resolution
        # Nodes whose free capacity moved since the last round (their index buckets are
        # re-sorted) and whose holders changed (their known end is recomputed).
        self.touched: set[str] = set()
        self.ends_stale: set[str] = set()
        self.on_node: dict[str, set[str]] = {}
        # Nodes whose holders changed, in order: the replica timelines summed for a
        # starving gang's shape (`_Timelines`) catch up from where they last read.
        self.changed: list[str] = []
        self.timelines: dict[tuple[Shape, tuple[str, ...] | None], _Timelines] = {}
        # Each node as built, nothing taken: what its timelines start from.
        self.bases: dict[str, NodeCapacity] = {}
        self.config = snapshot.config
        self.nodes = snapshot.nodes
        # Accepted reservations not over: each round keeps their idle capacity from the
        # queue as a pass does (`reservations.Reserved`, made afresh per round).
        self.reservations = {
            rid: r for rid, r in sorted(snapshot.reservations.items()) if live(r, now)
        }
        self.booked: Reserved | None = None
        allocs = snapshot.allocations
        holding = [a for a in allocs.values() if a.holds_capacity(now)]
        self.view = view = CapacityView(snapshot.nodes, holding)
        # Every change of a node's free GPUs (takes, gives, a trial's undo) moves it to the
        # end of an index bucket; note which, to put those buckets back in order.
        change = view._change
        touched = self.touched

        def noting(n: NodeCapacity, indices: Sequence[int], take: bool) -> None:
            touched.add(n.id)
            change(n, indices, take)

        view._change = noting  # type: ignore[method-assign]
        self.ledger = Ledger(snapshot)
        self.models_of = self.ledger.gpu_models
        # Hard ends to come: (time, tie-break, allocation id, ""), and the starts and ends
        # of reservation windows: (time, 0, "", what); the heap is the timeline.
        self.ends: list[tuple[float, int, str, str]] = []
        for rid, r in self.reservations.items():
            if r.start_time > now:
                self.ends.append((r.start_time, 0, "", f"the start of reservation {rid}"))
            self.ends.append((r.end_time, 0, "", f"the end of reservation {rid}"))
        heapq.heapify(self.ends)
        self.running: dict[str, _Running] = {}
        # Victims in their grace: the ledger counts them as leaving until they are gone.
        self.leaving: set[str] = {a.id for a in holding if a.state == AllocationState.PREEMPTED}
        grace = self.config.preemption_grace_seconds
        victims = {p.allocation_id for p in decisions.preemptions}
        for a in holding:
            end = frees_at(a)
            if a.id in victims:
                end = now + grace  # preempted by this pass: gone when its grace ends
                self.ledger.add_leaving(a.tenant, Amount.of_placed(a, self.models_of))
                self.leaving.add(a.id)
            self._run(a, end)
        for adm in decisions.admissions:
            placed = allocs.get(adm.allocation_id)
            if placed is None:
                continue
            a = _placed(placed, adm.placements, now)
            self.view_take(a)
            self.ledger.add_held(a.tenant, Amount.of_placed(a, self.models_of))
            _no_longer_pending(self.ledger, placed)
            self._run(a, a.max_end_time)
        # Requests whose victims are leaving: a pass tries them first.
        self.preemptors = {p.preemptor_id for p in decisions.preemptions} | {
            a.preempted_by for a in holding if a.state == AllocationState.PREEMPTED
        }
        # Capacity the pass set aside for preemptors, given to them at their turn.
        self.reserved: dict[str, list[tuple[str, tuple[int, ...], int, int]]] = {}
        for pid, nid, gpus, cpu, mem in decisions.reserved:
            if nid in self.view.nodes:
                self.view.take(nid, gpus, cpu, mem)
                self.reserved.setdefault(pid, []).append((nid, gpus, cpu, mem))
        ranked = sorted(decisions.pending.items(), key=lambda kv: kv[1].position)
        self.queue: list[Allocation] = [
            allocs[aid] for aid, _ in ranked[: max(0, limit)] if aid in allocs
        ]
        self.out: dict[str, Estimate] = {}
        self.skipped = [(aid, st.position) for aid, st in ranked[max(0, limit) :]]
        if snapshot.budgets:
            # Work the budget holds back does not start in the replay (a pass would not
            # start it either): it waits for its budget period, whatever frees.
            waiting: list[Allocation] = []
            for a in self.queue:
                wait = budget_wait(a, snapshot.budgets, snapshot.prices, now)
                if wait is None:
                    waiting.append(a)
                else:
                    self.out[a.id] = wait
            self.queue = waiting
        self.limit = limit
        self.released = 0
        self.last_event = ""

    # -- the timeline -------------------------------------------------------------------

    def view_take(self, a: Allocation) -> None:
        for p in a.placements:
            self.view.take(p.node_id, p.gpu_indices, a.shape.cpu_millis, a.shape.memory_bytes)

    def _run(self, a: Allocation, end: float | None) -> None:
        r = self.reservations.get(a.reservation_id) if a.reservation_id else None
        if r is not None:
            # Work inside a reservation never outlives its window: it expires then.
            end = r.end_time if end is None else min(end, r.end_time)
        self.running[a.id] = _Running(a, end)
        for p in a.placements:
            self.on_node.setdefault(p.node_id, set()).add(a.id)
            self.ends_stale.add(p.node_id)
            self.changed.append(p.node_id)
        if end is not None:
            heapq.heappush(self.ends, (end, len(self.running), a.id, ""))

    def _release_until(self, t: float) -> None:
        while self.ends and self.ends[0][0] <= t:
            _, _, aid, what = heapq.heappop(self.ends)
            if not aid:
                self.last_event = what  # a reservation window starts or ends
                continue
            a = self.running.pop(aid).alloc
            self.view.release(a)
            for p in a.placements:
                self.ends_stale.add(p.node_id)
                self.on_node[p.node_id].discard(aid)
                self.changed.append(p.node_id)
            amt = Amount.of_placed(a, self.models_of)
            self.ledger.add_held(a.tenant, amt, -1)
            if aid in self.leaving:
                self.leaving.discard(aid)
                self.ledger.add_leaving(a.tenant, amt, -1)
            self.released += 1
            self.last_event = f"the hard end of {aid}"
        if self.reservations:
            self._windows_over(t)

    def _windows_over(self, t: float) -> None:
        """Work still waiting for a reservation whose window is over by `t` is rejected
        (the engine does so when the window ends): out of the queue and its demand."""
        over = {rid: r for rid, r in self.reservations.items() if r.end_time <= t}
        if not over:
            return
        keep: list[Allocation] = []
        for a in self.queue:
            r = over.get(a.reservation_id) if a.reservation_id else None
            if r is None:
                keep.append(a)
                continue
            _no_longer_pending(self.ledger, a, placed=False)
            self.out[a.id] = Estimate(
                None,
                f"unknown: reservation {r.id} ends at {when(r.end_time)} before there is "
                "room in it; it is rejected then",
            )
        self.queue = keep

    def run(self) -> dict[str, Estimate]:
        # The pass at `now` placed what fits now: the next can start at the first end.
        step = self.resolution
        while self.queue and self.ends:
            t = self.ends[0][0]
            if step > 0:
                # Slurm's bf_resolution: ends within one step are handed back together,
                # at the step's start, so the estimate errs early, never late.
                t = max(self.now, math.floor(t / step) * step)
                upto = t + step - 1e-9
            else:
                upto = t
            self._release_until(upto)
            # Each pass holds nodes for starving gangs afresh, at their turn.
            # (A pass builds a fresh view; the replay keeps one across its timeline.)
            self.view.lift_holds()
            if self._may_fit():
                self._round(t, upto)
        for a in self.queue:
            self.out[a.id] = Estimate(None, self._unknown(a))
        for aid, pos in self.skipped:
            self.out[aid] = Estimate(
                None,
                f"not estimated: queue position {pos} is past the first {self.limit} "
                "(estimate_queue_depth)",
            )
        return self.out

    def _may_fit(self) -> bool:
        """Could anything waiting fit now, by capacity (any model, no holds) and quota?
        A necessary condition, one check per kind of request: an end that frees too
        little for any of them costs no replay."""
        seen: set[tuple[object, ...]] = set()
        led = self.ledger
        for a in self.queue:
            key = (a.tenant, a.shape, a.count, a.id if a.id in self.reserved else "")
            if key in seen:
                continue
            seen.add(key)
            amt = Amount.of_request(a)
            if led.limit_block(a.tenant, amt) is not None or led.lending_block(a.tenant, amt):
                continue
            if self._fits(a):
                return True
        return False

    def _fits(self, a: Allocation) -> bool:
        st = self.view.statement()
        try:
            for nid, gpus, cpu, mem in self.reserved.get(a.id, ()):
                self.view.give(nid, gpus, cpu, mem)
            return self.view.fits(a.shape, a.count, owner=a.id, priority=a.priority)
        finally:
            st.discard()

    def _round(self, t: float, upto: float) -> None:
        """Place, in queue order, every waiting request that fits at time `t`: what a
        pass at `t` would do, on a view as a fresh pass would build it. (Every waiting
        request takes part, even one that cannot fit: a tenant's first request in line
        decides when the tenant's turn comes, as in the pass.) Reservation windows are
        taken as of `upto`, the end of the step handed back: a window that begins or
        ends within it does so at `t`, early as every estimate errs."""
        if self.reservations:
            holders = [r.alloc for r in self.running.values()]
            self.booked = Reserved(self.reservations, self.nodes, holders, upto)
            self.booked.withhold(self.view)
        # After withholding: a pass indexes its view once the reserved is out of it.
        _sort_buckets(self.view, self.touched)
        self.touched.clear()
        try:
            self._serve(t)
        finally:
            if self.booked is not None:
                # Between rounds the view holds only what runs: give the idle back.
                Reserved.lend(self.view, list(self.booked.shares.values()))
                self.booked = None

    def _serve(self, t: float) -> None:
        """The round's pass over the queue (`_round`)."""
        self.indexed: set[tuple[tuple[str, str], ...]] = set()
        _fresh_shares(self.ledger)
        if self.config.max_held_gangs > 0 and any(a.total_gpus > 1 for a in self.queue):
            self._node_ends()  # as of the round's start, as a pass builds its view
        left: list[Allocation] = []
        first = sorted((a for a in self.queue if a.id in self.preemptors), key=queue_key)
        rest = [w for w in self.queue if w.id not in self.preemptors]
        for p in first:
            if not self._attempt(p, t):
                left.append(p)
        fair = FairQueue(self.ledger, rest, Amount.of_request, queue_key)
        while (a := fair.pop()) is not None:
            if self._attempt(a, t):
                fair.touch(a.tenant)
            else:
                self._maybe_hold(a, t)
                left.append(a)
        self.queue = left

    def _attempt(self, a: Allocation, t: float) -> bool:
        placements = self._try(a, t)
        if placements is None:
            return False
        placed = _placed(a, placements, t)
        self.ledger.add_held(a.tenant, Amount.of_placed(placed, self.models_of))
        _no_longer_pending(self.ledger, a)
        self.reserved.pop(a.id, None)
        self.preemptors.discard(a.id)
        self._run(placed, placed.max_end_time)
        self.out[a.id] = Estimate(t, self._reason(a, t))
        return True

    def _models(self, a: Allocation) -> tuple[str, ...] | None:
        """The GPU models `a` may take under its quota, as the pass asks (None: any)."""
        if a.shape.gpus <= 0 or a.shape.gpu_model:
            return None
        return self.ledger.allowed_models(a.tenant, Amount.of_request(a).gpus, self.view.models)

    def _try(self, a: Allocation, t: float) -> tuple[Placement, ...] | None:
        amt = Amount.of_request(a)
        led = self.ledger
        if led.limit_block(a.tenant, amt) is not None or led.lending_block(a.tenant, amt):
            return None
        models = self._models(a)
        if models == ():
            return None
        booked = self.booked
        if a.reservation_id:
            # Inside its reservation only, once the window has begun (as the pass).
            return None if booked is None else booked.place_inside(a)[0]
        # Its hard end if placed at `t`: held nodes take it if the gang starts no sooner,
        # reserved capacity if the reservation starts no sooner.
        end = hard_end(a, t)
        reserved = self.reserved.get(a.id)
        lent = []
        if booked is not None:
            lent = [x for x in booked.shares.values() if may_backfill(a, x.reservation, t)]
        if not reserved and not lent:
            self._indexing(a)
            # Outside a statement, so the view remembers what did not fit until capacity
            # grows: requests alike cost one search per end.
            return self.view.place_gang(
                a.shape, a.count, owner=a.id, priority=a.priority, models=models, end=end
            )
        st = self.view.statement()
        for nid, gpus, cpu, mem in reserved or ():
            self.view.give(nid, gpus, cpu, mem)
        Reserved.lend(self.view, lent)
        self._indexing(a)
        placements = self.view.place_gang(
            a.shape, a.count, owner=a.id, priority=a.priority, models=models, end=end
        )
        if placements is None:
            st.discard()
            return None
        if booked is not None and lent:
            booked.take_back(self.view, lent)  # what it left stays reserved
        st.commit()
        return placements

    def _indexing(self, a: Allocation) -> None:
        """A pass builds a node selector's index at its first placement, from what is
        free then, in node order: what changed before (reserved capacity withheld, or
        lent to this request) moved no node to the end of a bucket. So at the round's
        first placement for a selector, those buckets go back in node order."""
        sel = a.shape.node_selector
        if sel not in self.indexed:
            self.indexed.add(sel)
            _sort_buckets(self.view, self.touched, sel)

    def _maybe_hold(self, a: Allocation, t: float) -> None:
        """The cycle's rule for starving gangs, at the time it would apply."""
        view = self.view
        c = self.config
        if (
            a.id in view.holders
            or len(view.holders) >= c.max_held_gangs
            or a.total_gpus <= 1
            or t - a.create_time < c.starvation_seconds
            or a.reservation_id  # waits for its reservation, not for capacity
        ):
            return
        # Only a gang blocked by capacity gets nodes held (not by quota), as in the pass.
        amt = Amount.of_request(a)
        if self.ledger.limit_block(a.tenant, amt) is not None or self.ledger.lending_block(
            a.tenant, amt
        ):
            return
        models = self._models(a)
        if models == ():
            return
        nodes = nodes_to_hold(
            view, a.shape, a.count, owner=a.id, priority=a.priority, models=models
        )
        if nodes is None:
            return
        # Conservative backfill as the pass allows it: until the gang's earliest start
        # with what runs now (this round's placements included) ending at its hard end.
        start = self._timelines(a.shape, models).start(a.count, t)
        view.hold(nodes, a.id, a.priority, -math.inf if start is None else start)

    def _timelines(self, shape: Shape, models: tuple[str, ...] | None) -> _Timelines:
        """Every node's `replica_timeline` for `shape`, as its holders are now: built once
        per gang shape, then only the nodes whose holders changed are recomputed (a round
        changes a few, and each round holds for the gang afresh)."""
        key = (shape, models)
        tls = self.timelines.get(key)
        if tls is None:
            tls = self.timelines[key] = _Timelines(len(self.changed))
            todo: Iterable[str] = sorted(self.nodes)
        else:
            todo = sorted(set(self.changed[tls.read :]))
            tls.read = len(self.changed)
        for nid in todo:
            held: list[Held] = []
            for aid in sorted(self.on_node.get(nid, ())):
                r = self.running[aid]
                end = math.inf if r.end is None else r.end
                sh = r.alloc.shape
                for p in r.alloc.placements:
                    if p.node_id == nid:
                        held.append((end, p.gpu_indices, sh.cpu_millis, sh.memory_bytes))
            base = self.bases.get(nid)
            if base is None:
                base = self.bases[nid] = NodeCapacity(self.nodes[nid])
            tls.put(nid, replica_timeline(base, held, shape, models))
        return tls

    def _node_ends(self) -> None:
        """When each node's holders are known to end, as a fresh view counts it: what
        `nodes_to_hold` ranks nodes by."""
        for nid in self.ends_stale:
            n = self.view.nodes.get(nid)
            if n is None:
                continue
            n.end_time = 0.0
            for aid in self.on_node.get(nid, ()):
                end = self.running[aid].end
                n.end_time = max(n.end_time, math.inf if end is None else end)
        self.ends_stale.clear()

    # -- words ----------------------------------------------------------------------------

    def _reason(self, a: Allocation, t: float) -> str:
        n = self.released
        ends = "1 hard end" if n == 1 else f"{n} hard ends"
        where = f"in reservation {a.reservation_id}: " if a.reservation_id else ""
        return (
            f"{where}capacity frees at {self.last_event} ({ends} from now), "
            "if work runs to its hard end and nothing new arrives; sooner if work ends early"
        )

    def _unknown(self, a: Allocation) -> str:
        if a.reservation_id and a.reservation_id not in self.reservations:
            return f"unknown: reservation {a.reservation_id} is over or cancelled"
        block = self.ledger.limit_block(a.tenant, Amount.of_request(a))
        if block is not None:
            return f"unknown: {block.text()}, and that quota is held by work without a hard end"
        never = self.view.never_fits(a.shape, a.count)
        if never is not None:
            return "unknown: " + never
        return NO_HARD_END


def budget_wait(
    a: Allocation, budgets: Mapping[str, BudgetLeft], prices: PriceTable, now: float
) -> Estimate | None:
    """When a budget holds `a` back: not before the budget periods that block it begin
    anew (capacity permitting, so an early bound), or unknown when no period would do
    (a budget that never resets, or one too small for the request's whole duration)."""
    block = budget_block(a, budgets, prices)
    if block is None:
        return None
    why = block[1]
    left = dict(budgets)
    start = now
    while block is not None:
        tenant = block[0]
        b = left[tenant]
        if not b.period.resets or b.spent == 0:
            return Estimate(None, f"unknown: {why}, and a new period would not cover it")
        start = max(start, b.period.end(b.period.start(now)))
        left[tenant] = replace(b, spent=0.0)
        block = budget_block(a, left, prices)
    return Estimate(start, f"not before {when(start)}, when the budget period begins anew: {why}")


class _Timelines:
    """Nodes' replica timelines for one shape, summed: replicas that fit now, and the
    replicas gained at each hard end (`placement.start_from`, kept up to date)."""

    def __init__(self, read: int) -> None:
        self.read = read  # how much of the estimator's change log is reflected
        self.nodes: dict[str, Timeline | None] = {}
        self.room = 0
        self.gains: dict[float, int] = {}

    def put(self, nid: str, tl: Timeline | None) -> None:
        for sign, x in ((-1, self.nodes.get(nid)), (1, tl)):
            if x is None:
                continue
            self.room += sign * x[0]
            for end, gain in x[1]:
                left = self.gains.get(end, 0) + sign * gain
                if left:
                    self.gains[end] = left
                else:
                    del self.gains[end]
        self.nodes[nid] = tl

    def start(self, count: int, now: float) -> float | None:
        return start_from([(self.room, tuple(self.gains.items()))], count, now)


def _placed(a: Allocation, placements: Sequence[Placement], t: float) -> Allocation:
    """`a` as the simulation places it at `t` (a copy: the snapshot is never changed)."""
    end = t + a.max_duration_seconds if a.max_duration_seconds > 0 else None
    return Allocation(
        id=a.id,
        tenant=a.tenant,
        count=a.count,
        shape=a.shape,
        priority=a.priority,
        max_duration_seconds=a.max_duration_seconds,
        reservation_id=a.reservation_id,
        state=AllocationState.ALLOCATED,
        placements=tuple(placements),
        create_time=a.create_time,
        allocate_time=t,
        max_end_time=end,
        seq=a.seq,
    )


def _no_longer_pending(ledger: Ledger, a: Allocation, *, placed: bool = True) -> None:
    """Take a placed (or rejected) request out of the ledger's pending demand, as the
    next pass's ledger (built from its snapshot) would not count it."""
    amt = Amount.of_request(a)
    ledger._bump(ledger.own_pending, a.tenant, amt, -1)
    for t in ledger.tree.chain(a.tenant):
        ledger._bump(ledger.pending, t, amt, -1)
        ledger.waiting[t] = ledger.waiting.get(t, 0) - 1
        if placed:
            ledger.running[t] = ledger.running.get(t, 0) + 1


def _fresh_shares(ledger: Ledger) -> None:
    """Fair shares from the demand and holdings of now, as a fresh ledger computes them
    (the queue serves tenants below their fair share first)."""
    ledger.own_fair = {}
    ledger.fair = fair_shares(ledger)
    # Queue scores are remembered per usage version, and say whether a level is below its
    # fair share: new shares make every remembered one stale, held usage changed or not.
    ledger._score_memo.clear()
    demand = [0, 0, 0]
    for t in ledger.tree.roots:
        d = ledger.effective(t).vector()
        p = (ledger.pending.get(t) or Amount()).vector()
        for i in range(3):
            demand[i] += d[i] + p[i]
    tot = ledger.total.vector()
    ledger.contended = (demand[0] > tot[0], demand[1] > tot[1], demand[2] > tot[2])


def _sort_buckets(
    view: CapacityView, touched: set[str], only: tuple[tuple[str, str], ...] | None = None
) -> None:
    """Put the index buckets that `touched` nodes moved into back in node order, as a
    fresh view builds them: a best-fit tie then goes to the node a pass would pick.
    `only`: the buckets of that node selector's index alone."""
    buckets: dict[int, dict[str, None]] = {}
    for nid in touched:
        n = view.nodes.get(nid)
        if n is None:
            continue
        total = n.total_free
        for idx in n.indexes:
            if only is not None and idx.selector != only:
                continue
            for m, lst in n.free.items():
                b = idx.by_model[m][len(lst)]
                buckets[id(b)] = b
            if total < len(idx.by_total):
                b = idx.by_total[total]
                buckets[id(b)] = b
    for b in buckets.values():
        order = sorted(b)
        if list(b) != order:
            b.clear()
            b.update(dict.fromkeys(order))


def estimate_starts(
    snapshot: Snapshot, decisions: Decisions, limit: int, resolution: float = 0.0
) -> dict[str, Estimate]:
    """An estimate for every request still pending after `decisions` (the pass run on
    `snapshot`): the first `limit` in queue order simulated, the rest "not estimated".
    `resolution` > 0 replays passes only every so many seconds (Slurm's bf_resolution),
    each handing back what ends in its step: fewer replays, estimates rounded down."""
    return _Estimator(snapshot, decisions, limit, resolution).run()
