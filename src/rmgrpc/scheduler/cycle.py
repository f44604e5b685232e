"""One scheduling pass: the pending queue in, admissions, preemptions and reasons out.

The pass, in order (KAI's session running its actions over one snapshot):

1. Preemptors first. A pending allocation that earlier preempted victims gets the
   capacity they free before anyone else: while victims are still in their grace, what
   it will need beyond their capacity is set aside so nobody takes it; once they are
   gone, it is placed first.
2. The queue. Pending allocations are taken in order: priority (higher first), then
   requests inside their tenant's guarantee before borrowers, then the tenant's
   hierarchical order key (`Ledger.order_key`: siblings compared by weighted dominant
   share of recent usage, level by level from the root; recomputed as the pass admits
   work), then arrival. Each is checked against quota, placed if it fits (smaller
   requests pass a blocked larger one), or else may preempt (see `preemption`), or waits
   with a reason. A request no registered node could ever host says so.
3. Starving gangs, at their turn. A multi-GPU request pending longer than
   `starvation_seconds` that does not fit when its turn comes gets nodes held for it
   (up to `max_held_gangs`): those that would host it soonest and most cheaply. Nothing
   after it in the queue (of its priority or lower) is placed on them, so capacity
   freeing there piles up for it instead of going to smaller requests behind it —
   except work whose hard end comes no later than the earliest the gang could start
   (`placement.earliest_start`, over the whole cluster): that conservative backfill is
   gone before the gang could use the nodes. Unknown (work without a hard end in the
   way): nothing passes.

Reservations (`reservations.Reserved`): the idle capacity of every accepted reservation
whose window is not over is kept out of the view. Work naming a reservation is placed in
that reservation's capacity only, once its window has begun; other work may use it only
to backfill — when its hard end comes no later than the reservation's start — and an
allocation holding reserved GPUs is never chosen as a victim for others.

Everything iterates in sorted or insertion order over sorted inputs, so the same
snapshot always gives the same decisions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from rmgrpc.cost import pending_budget_reason
from rmgrpc.model import (
    Allocation,
    AllocationState,
    Placement,
    Reservation,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.fairshare import Amount, FairQueue, Ledger, QuotaBlock, check_admissible
from rmgrpc.scheduler.placement import (
    CapacityView,
    Held,
    earliest_start,
    gpus_text,
    nodes_to_hold,
)
from rmgrpc.scheduler.preemption import (
    Mode,
    Policy,
    Victim,
    VictimPool,
    borrowers,
    reason_for,
    select_victims,
)
from rmgrpc.scheduler.reservations import Reserved, when
from rmgrpc.scheduler.snapshot import (
    Admission,
    Decisions,
    DryRun,
    PendingStatus,
    Preemption,
    Snapshot,
)

_ADMITTED = "admitted"
_WAITING = "waiting for victims"
_QUOTA = "quota"
_CAPACITY = "capacity"
_INVALID = "invalid"
_RESERVATION = "reservation"

DRY_RUN_ID = "dry-run"

_FailKey = tuple[Shape, int, str, int, "tuple[str, ...] | None", float]


def arrival_key(a: Allocation) -> tuple[int, float, str]:
    return (a.seq, a.create_time, a.id)


def queue_key(a: Allocation) -> tuple[int, int, float, str]:
    """Order within one tenant: priority, then arrival."""
    return (-a.priority, a.seq, a.create_time, a.id)


def _seconds(x: float) -> str:
    return f"{max(0, round(x))} s"


def frees_at(a: Allocation) -> float | None:
    """When placed work gives its capacity back at the latest: a victim when its grace
    ends, other work at its hard end (None: it has none)."""
    if a.state == AllocationState.PREEMPTED:
        return a.grace_end_time
    return a.max_end_time


def hard_end(a: Allocation, now: float) -> float:
    """When `a` would have to end if placed at `now` (inf: it has no hard end)."""
    return now + a.max_duration_seconds if a.max_duration_seconds > 0 else math.inf


class _Cycle:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.config = snapshot.config
        self.now = snapshot.now
        allocs = sorted(snapshot.allocations.values(), key=arrival_key)
        self.allocs = allocs
        self.pending = [a for a in allocs if a.state == AllocationState.PENDING]
        self.by_id = {a.id: a for a in allocs}
        holding = [a for a in allocs if a.holds_capacity(self.now)]
        self.holding = holding
        self.view = CapacityView(snapshot.nodes, holding)
        self.reserved = Reserved(snapshot.reservations, snapshot.nodes, holding, self.now)
        self.reserved.withhold(self.view)
        # What was free at the start, for `_fitted_at_start`: copies of the nodes now are
        # a few times cheaper than a second view built from the snapshot, and the same.
        self._start_nodes = {nid: n._copy() for nid, n in self.view.nodes.items()}
        self.ledger = Ledger(snapshot)
        self._pool: VictimPool | None = None
        self.budget = max(0, self.config.max_preemptions_per_cycle)
        self.decisions = Decisions()
        self.order: list[str] = []
        self.reasons: dict[str, str] = {}
        self.prefix: dict[str, str] = {}
        self.fail_keys: dict[str, _FailKey] = {}
        self.budget_hit: set[str] = set()
        self.handled: set[str] = set()
        self._preempt_failed: set[tuple[object, ...]] = set()
        self._amounts: dict[str, Amount] = {}
        self._amounts_alike: dict[tuple[Shape, int], Amount] = {}
        self._explained: dict[tuple[object, ...], str] = {}
        self._initial: CapacityView | None = None
        self._initial_fits: dict[_FailKey, bool] = {}
        self._sharing: bool | None = None
        self._policies: dict[str, Policy] = {}
        # The queue, in the hierarchical fair order (built when the queue is served).
        self.fair_queue: FairQueue | None = None

    # -- helpers ------------------------------------------------------------------------

    @property
    def pool(self) -> VictimPool:
        if self._pool is None:
            snap = self.snapshot
            if self.reserved:
                # Freeing reserved GPUs would hand them to the preemptor: never victims.
                kept = {k: a for k, a in snap.allocations.items() if not self.reserved.touches(a)}
                snap = dataclasses.replace(snap, allocations=kept)
            self._pool = VictimPool(snap, self.ledger)
        return self._pool

    def amount(self, a: Allocation) -> Amount:
        """What `a` asks for in all. Read-only: requests of one shape and count share one
        (it depends on nothing else), so a long queue makes a few hundred, not one each."""
        amt = self._amounts.get(a.id)
        if amt is None:
            key = (a.shape, a.count)
            amt = self._amounts_alike.get(key)
            if amt is None:
                amt = self._amounts_alike[key] = Amount.of_request(a)
            self._amounts[a.id] = amt
        return amt

    def placed_amount(self, a: Allocation, placements: Sequence[Placement]) -> Amount:
        s = a.shape
        amt = Amount(0, s.cpu_millis * len(placements), s.memory_bytes * len(placements))
        for p in placements:
            models = self.view.nodes[p.node_id].gpu_models
            amt.gpus += len(p.gpu_indices)
            for i in p.gpu_indices:
                m = models.get(i, s.gpu_model)
                amt.models[m] = amt.models.get(m, 0) + 1
        return amt

    def _touch(self, tenant: str) -> None:
        """A tenant's usage changed: re-key it and its ancestors in the queue."""
        if self.fair_queue is not None:
            self.fair_queue.touch(tenant)

    def _wait(self, a: Allocation) -> None:
        self.order.append(a.id)
        self.handled.add(a.id)

    # -- the pass -------------------------------------------------------------------------

    def run(self) -> Decisions:
        self._preemptors_first()
        self._queue()
        self._explain()
        return self.decisions

    def _preemptors_first(self) -> None:
        victims_of: dict[str, list[Allocation]] = {}
        for a in self.allocs:
            if a.state == AllocationState.PREEMPTED and a.preempted_by:
                victims_of.setdefault(a.preempted_by, []).append(a)
        preemptors = [
            self.by_id[pid]
            for pid in victims_of
            if pid in self.by_id and self.by_id[pid].state == AllocationState.PENDING
        ]
        for p in sorted(preemptors, key=queue_key):
            waiting = [v for v in victims_of[p.id] if v.holds_capacity(self.now)]
            if waiting:
                if self._reserve(p, waiting):
                    self._wait(p)
                    reclaim = [v for v in waiting if "reclaims its guaranteed" in v.state_reason]
                    self.reasons[p.id] = self._waiting_text(waiting, bool(reclaim))
            else:
                outcome = self._attempt(p, allow_preempt=False)
                if outcome == _ADMITTED:
                    self.handled.add(p.id)

    def _waiting_text(self, victims: Sequence[Allocation], reclaim: bool = False) -> str:
        ends = [v.grace_end_time for v in victims if v.grace_end_time is not None]
        n = len(victims)
        what = "allocation to release its" if n == 1 else "allocations to release their"
        text = f"waiting for {n} preempted {what} GPUs"
        if reclaim:
            # Say whom the guarantee is being reclaimed from: the operator's next question.
            owners = ", ".join(sorted({v.tenant for v in victims}))
            text = f"reclaiming its guaranteed quota from {owners}: " + text
        if ends:
            text += f" (grace ends in {_seconds(max(ends) - self.now)})"
        return text

    def _reserve(self, p: Allocation, victims: Sequence[Allocation]) -> bool:
        """Set aside what `p` needs beyond its victims' capacity, so nobody else takes it."""
        models = self._models(p)
        if models == ():
            return False
        st = self.view.statement()
        for v in victims:
            self.view.release(v)
        placements = self.view.place_gang(
            p.shape, p.count, owner=p.id, priority=p.priority, models=models
        )
        st.discard()
        if placements is None:
            return False
        freed: dict[str, tuple[set[int], int, int]] = {}
        for v in victims:
            for pl in v.placements:
                g, c, m = freed.get(pl.node_id, (set(), 0, 0))
                freed[pl.node_id] = (
                    g | set(pl.gpu_indices),
                    c + v.shape.cpu_millis,
                    m + v.shape.memory_bytes,
                )
        need: dict[str, tuple[set[int], int, int]] = {}
        for pl in placements:
            g, c, m = need.get(pl.node_id, (set(), 0, 0))
            need[pl.node_id] = (
                g | set(pl.gpu_indices),
                c + p.shape.cpu_millis,
                m + p.shape.memory_bytes,
            )
        for nid in sorted(need):
            g, c, m = need[nid]
            fg, fc, fm = freed.get(nid, (set(), 0, 0))
            extra = (tuple(sorted(g - fg)), max(0, c - fc), max(0, m - fm))
            self.view.take(nid, *extra)
            self.decisions.reserved.append((p.id, nid, *extra))
        return True

    def _starving(self, a: Allocation) -> bool:
        """A gang blocked long enough to hold nodes for (only multi-GPU requests can be
        passed over by smaller ones: any GPU that frees fits a 1-GPU request in its turn)."""
        return (
            len(self.view.holders) < self.config.max_held_gangs
            and a.total_gpus > 1
            and self.now - a.create_time >= self.config.starvation_seconds
        )

    def _hold_for(self, a: Allocation) -> None:
        """Hold the nodes that would host `a` soonest, against everything after it."""
        models = self._models(a)
        nodes = nodes_to_hold(
            self.view, a.shape, a.count, owner=a.id, priority=a.priority, models=models
        )
        if nodes is None:
            return
        until = self._gang_start(a, models)
        self.view.hold(nodes, a.id, a.priority, until)
        self.decisions.held_nodes[a.id] = nodes
        what = (
            "1 node for this gang as it frees"
            if len(nodes) == 1
            else (f"{len(nodes)} nodes for this gang as they free")
        )
        self.prefix[a.id] = (
            f"pending {_seconds(self.now - a.create_time)}: holding {what} ({', '.join(nodes)})"
        )
        if until > self.now:
            self.prefix[a.id] += (
                f", backfilled meanwhile only by work ending within {_seconds(until - self.now)}"
            )

    def _gang_start(self, a: Allocation, models: tuple[str, ...] | None) -> float:
        """The earliest `a` could start if nothing new were placed and all running work
        (this pass's admissions included) ran to its hard end (`earliest_start`): what its
        hold lets backfill run to. -inf when unknown (work without a hard end stands in
        the way): then the hold keeps all its priority or lower off, as it always did."""
        now = self.now
        gone = now + max(0.0, self.config.preemption_grace_seconds)
        victims = {p.allocation_id for p in self.decisions.preemptions}
        held: dict[str, list[Held]] = {}

        def add(x: Allocation, placements: Sequence[Placement], end: float) -> None:
            for p in placements:
                held.setdefault(p.node_id, []).append(
                    (end, p.gpu_indices, x.shape.cpu_millis, x.shape.memory_bytes)
                )

        windows = self.snapshot.reservations
        for h in self.holding:
            end = frees_at(h)
            end = math.inf if end is None else end
            if h.reservation_id in windows:
                end = min(end, windows[h.reservation_id].end_time)  # expires with it
            add(h, h.placements, min(end, gone) if h.id in victims else end)
        for adm in self.decisions.admissions:
            x = self.by_id[adm.allocation_id]
            add(x, adm.placements, hard_end(x, now))
        start = earliest_start(self.snapshot.nodes, held, a.shape, a.count, now=now, models=models)
        return -math.inf if start is None else start

    def _queue(self) -> None:
        self.fair_queue = FairQueue(
            self.ledger,
            (a for a in self.pending if a.id not in self.handled),
            self.amount,
            queue_key,
        )
        while (a := self.fair_queue.pop()) is not None:
            outcome = self._attempt(a)
            if outcome != _ADMITTED:
                if outcome == _CAPACITY and self._starving(a):
                    self._hold_for(a)
                self._wait(a)

    # -- one request ----------------------------------------------------------------------

    def _models(self, a: Allocation) -> tuple[str, ...] | None:
        if a.shape.gpus <= 0 or a.shape.gpu_model:
            return None
        return self.ledger.allowed_models(a.tenant, self.amount(a).gpus, self.view.models)

    def _attempt(self, a: Allocation, *, allow_preempt: bool = True) -> str:
        if a.count <= 0:
            self.reasons[a.id] = "count must be at least 1"
            return _INVALID
        spent = pending_budget_reason(a, self.snapshot.budgets, self.snapshot.prices)
        if spent is not None:
            self.reasons[a.id] = spent
            return _QUOTA
        amt = self.amount(a)
        block = self.ledger.limit_block(a.tenant, amt)
        if block is not None:
            if allow_preempt:
                # Quota-bound: the victims must free quota inside the blocking subtree
                # (and capacity, where it is short too); one search weighs both.
                outcome = self._try_preempt(a, None, block)
                if outcome is not None:
                    return outcome
            self.reasons[a.id] = block.text()
            return _QUOTA
        lent = self.ledger.lending_block(a.tenant, amt)
        if lent is not None:
            self.reasons[a.id] = lent
            return _QUOTA
        models = self._models(a)
        if models == ():
            self.reasons[a.id] = (
                f"over quota of tenant {a.tenant}: no GPU model has room for "
                f"{gpus_text(amt.gpus)} under its per-model limits"
            )
            return _QUOTA
        if a.reservation_id:
            placements, why = self.reserved.place_inside(a)
            if placements is None:
                self.reasons[a.id] = why
                return _RESERVATION
            self._admit(a, placements)
            return _ADMITTED
        placements = self._place(a, models)
        if placements is not None:
            self._admit(a, placements)
            return _ADMITTED
        if allow_preempt:
            outcome = self._try_preempt(a, models)
            if outcome is not None:
                return outcome
        self.fail_keys[a.id] = (a.shape, a.count, a.id, a.priority, models, hard_end(a, self.now))
        blocking = self.reserved.blocking(a) if self.reserved else []
        if blocking and a.id not in self.reasons:
            self.reasons[a.id] = _reserved_text(a, blocking)
        return _CAPACITY

    def _place(self, a: Allocation, models: tuple[str, ...] | None) -> tuple[Placement, ...] | None:
        """Places ordinary work, lending it the idle reserved capacity it may backfill (and
        nodes held for a starving gang it ends in time for)."""
        lent = self.reserved.lendable(a) if self.reserved else []
        end = hard_end(a, self.now)
        if not lent:
            return self.view.place_gang(
                a.shape, a.count, owner=a.id, priority=a.priority, models=models, end=end
            )
        st = self.view.statement()
        Reserved.lend(self.view, lent)
        placements = self.view.place_gang(
            a.shape, a.count, owner=a.id, priority=a.priority, models=models, end=end
        )
        if placements is None:
            st.discard()
            return None
        self.reserved.take_back(self.view, lent)
        st.commit()
        return placements

    def _admit(self, a: Allocation, placements: tuple[Placement, ...]) -> None:
        self.decisions.admissions.append(Admission(a.id, placements))
        self.ledger.add_held(a.tenant, self.placed_amount(a, placements))
        self.reasons.pop(a.id, None)
        self.fail_keys.pop(a.id, None)
        self._touch(a.tenant)

    def _try_preempt(
        self, a: Allocation, models: tuple[str, ...] | None, block: QuotaBlock | None = None
    ) -> str | None:
        """Preempt for `a` if some mode finds victims. Reclaiming a guarantee comes first:
        borrowed capacity goes back before the tenant's own lower-priority work."""
        amt = self.amount(a)
        modes = []
        pool = self.pool
        policy = self._policy(a.tenant)
        by_priority = self._by_priority(a, pool, policy)
        if self.budget <= 0 and len(pool) and by_priority:
            # The limit is reached and a mode applies: nothing else to learn (skips the
            # guarantee and fair-share sums for most of a full cluster's queue).
            self.budget_hit.add(a.id)
            return None
        inside = self.ledger.within_guarantee(a.tenant, amt)
        if not len(pool):
            if inside:
                self.reasons[a.id] = self._reclaim_text(a)
            return None
        if inside:
            modes.append(Mode.GUARANTEE)
        equal_ok = policy.within == WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY
        if by_priority:
            modes.append(Mode.PRIORITY)
        if block is None and self.ledger.below_fair_share(a.tenant, amt):
            modes.append(Mode.FAIR_SHARE)
        if not modes:
            return None
        if self.budget <= 0:
            self.budget_hit.add(a.id)
            return None
        owner = a.id if a.id in self.view.holders else ""
        for mode in modes:
            # Requests alike share a failed search (the arrival order matters only
            # when equal priorities may be preempted).
            seq = a.seq if equal_ok else 0
            key = (a.tenant, a.priority, a.shape, a.count, models, mode, owner, block, seq)
            if key in self._preempt_failed:
                continue
            victims = select_victims(
                self.view,
                self.ledger,
                pool,
                a,
                mode,
                models=models,
                budget=self.budget,
                block=block,
                policy=policy,
            )
            if victims:
                return self._preempt(a, victims, mode, models)
            self._preempt_failed.add(key)
        if inside:
            self.reasons[a.id] = self._reclaim_text(a)
        return None

    def _by_priority(self, a: Allocation, pool: VictimPool, policy: Policy | None = None) -> bool:
        """Whether `a` may look for victims by priority (its own quota's policy)."""
        if policy is None:
            policy = self._policy(a.tenant)
        equal_ok = policy.within == WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY
        return a.priority > pool.min_priority or (equal_ok and a.priority >= pool.min_priority)

    def _policy(self, tenant: str) -> Policy:
        """`Policy.of` the tenant's quota, made once per tenant: the quotas are the
        snapshot's, fixed for the pass, and most of a long queue asks it."""
        got = self._policies.get(tenant)
        if got is None:
            got = self._policies[tenant] = Policy.of(self.snapshot.quotas.get(tenant))
        return got

    def _reclaim_text(self, a: Allocation) -> str:
        """What a tenant under its guarantee is waiting to reclaim, and from whom."""
        g = self.ledger.tree.guaranteed(a.tenant).gpus
        held = self.ledger.effective(a.tenant).gpus
        head = f"tenant {a.tenant} is under its guarantee"
        if g is not None:
            head += f" (holds {held} of {gpus_text(g)})"
        found = borrowers(self.ledger, a.tenant)
        if not found:
            return head + "; no other tenant borrows capacity to reclaim"
        names = ", ".join(f"{t} ({gpus_text(n)})" for t, n in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        return (
            f"{head}; waiting to reclaim from borrowers {names}{more}: none can be "
            "preempted now (too young, the per-cycle limit, or a preemption policy)"
        )

    def _preempt(
        self, a: Allocation, victims: list[Victim], mode: Mode, models: tuple[str, ...] | None
    ) -> str:
        pool = self.pool
        for v in victims:
            pool.taken.add(v.id)
            self.decisions.preemptions.append(Preemption(v.id, a.id, reason_for(mode, a, v)))
            self.budget -= 1
        if self.config.preemption_grace_seconds <= 0:
            st = self.view.statement()
            for v in victims:
                self.view.release(v.alloc)
                self.ledger.add_held(v.tenant, v.amount, -1)
            placements = None
            if models is None:
                # Quota-bound preemption comes here without the models the per-model
                # limits allow; with the victims gone from the ledger, ask now.
                models = self._models(a)
            if models != () and self.ledger.limit_block(a.tenant, self.amount(a)) is None:
                placements = self.view.place_gang(
                    a.shape, a.count, owner=a.id, priority=a.priority, models=models
                )
            st.commit()
            for v in victims:
                self._touch(v.tenant)
            if placements is not None:
                self._admit(a, placements)
                return _ADMITTED
            self.reasons[a.id] = "preempted allocations released their capacity; placing next cycle"
            return _WAITING
        for v in victims:
            self.ledger.add_leaving(v.tenant, v.amount)
            self._touch(v.tenant)
        self._reserve(a, [v.alloc for v in victims])
        grace_end = self.now + self.config.preemption_grace_seconds
        self.reasons[a.id] = self._waiting_text(
            [dataclasses.replace(v.alloc, grace_end_time=grace_end) for v in victims],
            mode == Mode.GUARANTEE,
        )
        return _WAITING

    # -- explanations -----------------------------------------------------------------

    def _capacity_text(self, key: _FailKey) -> str:
        shape, count, owner, priority, models, end = key
        # Only holds make the owner, priority and end matter: requests alike share one text.
        holders = self.view.holders
        memo = (
            shape,
            count,
            owner if owner in holders else "",
            priority if holders else 0,
            models,
            self.view.end_key(end) if holders else (),
        )
        text = self._explained.get(memo)
        if text is None:
            ex = self.view.explain(
                shape, count, owner=owner, priority=priority, models=models, end=end
            )
            text = ex.text()
            # The view at the start has no holds: owner, priority and end do not matter.
            if self._fitted_at_start((shape, count, "", 0, models, math.inf)):
                text = (
                    "waiting behind higher-priority or earlier requests placed first; now " + text
                )
            self._explained[memo] = text
        return text

    def _fitted_at_start(self, key: _FailKey) -> bool:
        got = self._initial_fits.get(key)
        if got is None:
            if self._initial is None:
                self._initial = CapacityView.of_copies(self._start_nodes)
            shape, count, _, _, models, _ = key
            got = self._initial.fits(shape, count, models=models)
            self._initial_fits[key] = got
        return got

    def _share_note(self, a: Allocation) -> str:
        """Where the tenant stands against its fair share, when GPUs are contended."""
        led = self.ledger
        if not led.contended[0] or a.shape.gpus <= 0 or led.total.gpus <= 0:
            return ""
        if self._sharing is None:
            users = [
                t
                for t in led.tree.parent
                if (led.own_held.get(t) or Amount()).gpus
                or (led.own_pending.get(t) or Amount()).gpus
            ]
            self._sharing = len(users) >= 2
        if not self._sharing:
            return ""  # nobody to share with: the share says nothing
        fair = self.ledger.fair.get(a.tenant, (0.0, 0.0, 0.0))[0]
        held = self.ledger.effective(a.tenant).gpus
        share = f"{fair:.1f}".removesuffix(".0")
        return f"tenant {a.tenant} holds {gpus_text(held)}, fair share {share}"

    def _explain(self) -> None:
        limit = self.config.max_preemptions_per_cycle
        notes: dict[tuple[str, bool], str] = {}
        for pos, aid in enumerate(self.order, start=1):
            key = self.fail_keys.get(aid)
            parts = []
            if aid in self.prefix:
                parts.append(self.prefix[aid])
            if aid in self.reasons:
                parts.append(self.reasons[aid])
            if key is not None:
                parts.append(self._capacity_text(key))
                a = self.by_id[aid]
                # The note reads only the tenant and whether GPUs are asked for, and the
                # ledger no longer changes: one per tenant, not one per waiting request.
                memo = (a.tenant, a.shape.gpus > 0)
                note = notes.get(memo)
                if note is None:
                    note = notes[memo] = self._share_note(a)
                if note:
                    parts.append(note)
            if aid in self.budget_hit:
                parts.append(f"preemption limit of {limit} per cycle reached")
            reason = "; ".join(parts) or "waiting"
            self.decisions.pending[aid] = PendingStatus(reason, pos)
        self.decisions.share_notes = {t: n for (t, gpus), n in notes.items() if gpus}


def _reserved_text(a: Allocation, blocking: Sequence[Reservation]) -> str:
    """Why reserved capacity is not for `a`, and how it could be."""
    first = blocking[0]
    more = f" and {len(blocking) - 1} more" if len(blocking) > 1 else ""
    how = (
        "set max_duration_seconds so it ends before then to backfill"
        if a.max_duration_seconds <= 0
        else f"its max_duration_seconds ({a.max_duration_seconds} s) runs past that start"
    )
    return (
        f"capacity reserved by {first.id}{more} (from {when(first.start_time)}) is kept for "
        f"the reservation; {how}"
    )


def run_cycle(snapshot: Snapshot) -> Decisions:
    """One scheduling pass over every PENDING allocation in the snapshot. Pure."""
    return _Cycle(snapshot).run()


def dry_run(snapshot: Snapshot, request: Allocation) -> DryRun:
    """What would happen to `request` (not in the snapshot) if it arrived now. Pure."""
    refused = check_admissible(snapshot, request)
    if refused is not None:
        return DryRun((), "would be refused: " + refused)
    rid = request.id or DRY_RUN_ID
    while rid in snapshot.allocations:
        rid = DRY_RUN_ID + ":" + rid
    seq = request.seq
    if seq <= 0:
        seq = max((a.seq for a in snapshot.allocations.values()), default=0) + 1
    req = dataclasses.replace(
        request,
        id=rid,
        state=AllocationState.PENDING,
        placements=(),
        seq=seq,
        create_time=request.create_time or snapshot.now,
        allocate_time=None,
    )
    allocations = dict(snapshot.allocations)
    allocations[rid] = req
    decisions = run_cycle(dataclasses.replace(snapshot, allocations=allocations))
    victims = tuple(p.allocation_id for p in decisions.preemptions if p.preemptor_id == rid)
    for adm in decisions.admissions:
        if adm.allocation_id == rid:
            return DryRun(adm.placements, "", victims)
    status = decisions.pending.get(rid)
    if status is None:
        return DryRun((), "waiting", victims)
    return DryRun((), status.reason, victims, status.position)
