"""The scheduling loop: full passes off the event loop, quick decisions on it.

**Full passes.** A pass takes a snapshot at the current revision (copies the read model
keeps for this, so nothing the event loop changes is read half-way), runs the pure core
in a worker thread, and hands the plan to `scheduler.apply`, which re-checks each
decision against the state as it is *now* and refuses what no longer holds; refused
work is considered again by the next pass. RPCs keep flowing while a pass runs. Passes
coalesce: whatever is asked while one runs is served by the next.

**Quick decisions.** Most requests need no pass. The queue is *settled* when the last
pass saw every pending request and nothing has happened since that could let one of
them fit (capacity freed, a node or quota changed): then a new request that fits in
free capacity (minus what the last pass held for starving gangs and set aside for
preemptors) takes it at once, since no pending request could have used it; one that
does not fit is answered PENDING with the filter chain's reason and left for the next
pass, which may preempt for it. When the queue is not settled the request waits for the
next pass, as the fair order requires. Either way a request costs the same however long
the queue is, except when it has to wait for a pass. The quick view is built once and
then followed in place — each change of what is held, each pass that moves its holds or
set-asides, each preemptor or held gang that stops waiting — to what a view built afresh
would be (a rebuild walks every node and running allocation on the event loop).

**Where passes run.** In a worker process by default (`engine.passes`), so a pass over a
deep queue never holds the GIL against the event loop (`pass_runner = "thread"`: in a
thread of this process). It comes back summed up (`scheduler.result.PassResult`): the
plan, a position per pending request, and only the reasons that changed, so applying it
costs what changed, not the depth of the queue.

**Status.** A pass's reasons for waiting are state (they are what `pending_reason`
says at a revision), so a changed reason is written as an UPDATED event — at once for a
request's first reason, then at most once per `REASON_EVERY` seconds per request and
`REASON_BUDGET` per pass, so a long queue cannot flood the log; they are written in
slices of `REASON_SLICE`, each followed by a pause as long as it took, and only those due
are looked at, so a pass costs the event loop what it writes, not the depth of the queue.
A request answered PENDING at once gets the reason a pass would give (the filter chain's,
ending with its tenant's fair-share note from the last pass), so passes rewrite only the
reasons that really changed. Queue positions are status only: the last pass's map,
served fresh by Get/List, never part of a revision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from rmgrpc import telemetry
from rmgrpc.clock import set_or_timeout
from rmgrpc.engine.passes import PassRunner, make_runner
from rmgrpc.engine.txn import Txn
from rmgrpc.errors import Unavailable
from rmgrpc.model import Allocation, AllocationEventType, AllocationState, Node, Placement, Quota
from rmgrpc.scheduler import apply
from rmgrpc.scheduler.fairshare import Amount, Ledger, UsageHistory
from rmgrpc.scheduler.placement import CapacityView, SetAsides, gpus_text
from rmgrpc.scheduler.reservations import Reserved
from rmgrpc.scheduler.result import EstimatePolicy, PassResult
from rmgrpc.scheduler.snapshot import Decisions, DryRun, Snapshot

if TYPE_CHECKING:
    from rmgrpc.engine.core import EngineCore

log = logging.getLogger("rmgrpc.engine")

CycleObserver = Callable[[float, PassResult], None]

QUEUED = "queued: the scheduler has not considered it yet"
# A changed reason for waiting is written at most this often per request...
REASON_EVERY = 30.0
# ...and at most this many per pass (first reasons always go).
REASON_BUDGET = 1000
# Reasons written per txn; more go in the next slice after a pause (`_next_slice`). Each
# is encoded on the event loop (~40-120 us): 50 keep a slice near 2-6 ms, which is what
# an RPC arriving meanwhile may wait (250 made a pass's apply, which writes the first
# slice, ~38 ms at 30,000 pending; 100, 6-13 ms).
REASON_SLICE = 50
# A pass's changed reasons taken in per turn of the event loop (~1.5-3.5 us each): a
# deep queue's pass names tens of thousands; taken whole they held the loop ~50 ms.
ABSORB_SLICE = 1024
# With work pending, a pass runs at least this often (starvation holds, positions).
REFRESH_EVERY = 5.0
# A pass asked only to refresh positions and reasons waits this long after the last.
REFRESH_GAP = 1.0


class Scheduling:
    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.state = engine.state
        self._kick = asyncio.Event()
        self._urgent = False
        self._requested = 0
        self._done = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Bumped by any change that may let pending work fit (capacity freed, a node or
        # quota changed); a pass settles the queue as of the epoch its snapshot had.
        self.epoch = 0
        self._settled_epoch = 0
        # Every PENDING allocation, and those no pass or quick decision has looked at yet.
        self._pending: set[str] = set()
        # PENDING allocations per tenant, for the limits on what one tenant may queue.
        self._pending_tenant: dict[str, str] = {}
        self.pending_of: dict[str, int] = {}
        self._unconsidered: set[str] = set()
        self._last: Decisions = Decisions()
        self._last_pending = 0
        # Status: each pending request's position as of the last pass.
        self.positions: dict[str, int] = {}
        # Reasons passes gave that are not written yet: first reasons (replacing
        # "queued"), in the order passes gave them, and later changes, each due once
        # `REASON_EVERY` has passed since that request's last write (`_due`, a heap of
        # (due time, id) with one entry per id in `_changes`). Writing takes the due
        # ones off the top, so a pass costs what is written, never the depth of a
        # queue whose reasons keep changing.
        self._firsts: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._changes: dict[str, str] = {}
        self._due: list[tuple[float, str]] = []
        # Changed reasons the last pass may still write (`REASON_BUDGET` per pass).
        self._budget = 0
        # What is left to take in of the last pass's changed reasons (`_absorb`).
        self._absorbing: Iterator[tuple[str, str]] | None = None
        # The next slice of reasons, when one is due (`_next_slice`).
        self.next_slice: asyncio.TimerHandle | None = None
        # The quick view (and ledger) being built off the event loop (`quick_ready`).
        self._build: _Build | None = None
        settings = engine.settings
        self.runner: PassRunner = make_runner(
            settings.pass_runner,
            EstimatePolicy(
                settings.estimate_queue_depth,
                settings.estimate_interval_seconds,
                settings.estimate_resolution_seconds,
            ),
            on_estimates=self._estimated,
        )
        # Status: start-time estimates of pending requests (start or None, reason), as of
        # the last pass that made them (every `estimate_interval_seconds`).
        self.estimates: dict[str, tuple[float | None, str]] = {}
        self._quick: tuple[CapacityView, Ledger] | None = None
        # The last pass's preemptor set-asides as the quick view took them: followed in
        # place as holders come and go and passes move them (`_holds_moved`).
        self._asides: SetAsides | None = None
        # The quick ledger outlives the view: holds moved by a pass change only the view,
        # and the ledger (quota and guarantee checks, no ordering) follows every change
        # of what is held in place, so rebuilding it (every running allocation, ~100 ms
        # at thousands) is left to node and quota changes.
        self._quick_ledger: Ledger | None = None
        # Reasons the quick view gave, while it has not changed: a full cluster explains
        # the same shape the same way, and a filter-chain walk over every node is the
        # dearest part of a quick decision.
        self._explained: dict[tuple[object, ...], str] = {}
        # Victims counted as leaving in the quick ledger (preempted, still in grace).
        self._leaving_ids: set[str] = set()
        self._models: tuple[str, ...] | None = None
        # Victims whose grace ended: dropped from the live set after the next pass,
        # which hands what they freed to their preemptor first.
        self.graced: list[str] = []
        self._reason_at: dict[str, float] = {}
        self._last_pass_end = 0.0
        self.last_cycle_seconds = 0.0
        self.passes = 0
        self.observers: list[CycleObserver] = []
        self._quick_placed = 0
        self._min_priority: int | None = None
        self._first_start: float | None = None
        self._dry_runs: dict[tuple[int, object], asyncio.Future[DryRun]] = {}
        # Recent usage of ended work, for fair share; derived from the retained
        # allocations on first use (so a restart rebuilds it), then followed as work ends.
        self._history: UsageHistory | None = None
        # Reserved capacity as the quick view withholds it (rebuilt with the view).
        self._reserved: Reserved | None = None

    # -- asking for passes -----------------------------------------------------------

    def changed(self) -> None:
        """A node or quota changed: decisions made on the old view no longer hold, and
        pending work may fit now."""
        self._invalidate()
        self._models = None
        self._unsettle()

    def _invalidate(self, *, ledger: bool = True) -> None:
        """Drops the quick view (and, unless `ledger` is False, the quick ledger)."""
        self._quick = None
        self._asides = None
        self._reserved = None
        self._explained.clear()
        if ledger:
            self._quick_ledger = None
            self._leaving_ids.clear()
            # Nodes or quotas changed: a build from the older copies is of no use. (A
            # view-only drop keeps it: it follows what is held, and the holds, set-asides
            # and reservations are laid on when it is installed.)
            self._build = None

    @property
    def gpu_models(self) -> tuple[str, ...]:
        """Every GPU model the cluster has (for admission checks), kept until a node changes."""
        if self._models is None:
            self._models = tuple(
                sorted({g.model for n in self.state.nodes.values() for g in n.gpus})
            )
        return self._models

    # The quick view and ledger follow every change of what is held, in place: rebuilding
    # them (every node, every running allocation) would stall the event loop.

    def _follow(self, a: Allocation, sign: int) -> None:
        """`a` takes (+1) or gives back (-1) its placements' capacity: the quick view and
        ledger follow."""
        if self._quick_ledger is not None:
            _follow_ledger(self._quick_ledger, self._leaving_ids, a, sign)
        if self._quick is None:
            if self._build is not None:
                self._build.ops.append((_FOLLOW, a, sign))
            return
        asides = self._asides
        assert asides is not None  # built with the view
        if self._reserved and (
            self._reserved.touches(a) or any(asides.on(p.node_id) for p in a.placements)
        ):
            # Reserved GPUs change hands, or set-asides would be taken again under what
            # is withheld: the quick view rebuilds both.
            self._invalidate(ledger=False)
            return
        view = self._quick[0]
        st = view.statement()  # committed at once: keeps the view's undo journal empty
        change = asides.take if sign > 0 else asides.give
        for p in a.placements:
            change(p.node_id, p.gpu_indices, a.shape.cpu_millis, a.shape.memory_bytes)
        st.commit()
        self._explained.clear()

    def usage_history(self) -> UsageHistory:
        """Recent usage of every ended allocation still retained (built once)."""
        if self._history is None:
            history = UsageHistory(self.engine.config.fair_share_half_life_seconds)
            if history.decay:
                ended = []
                for a in self.state.allocations.values():
                    if a.allocate_time is None or not a.state.terminal or self.state.holds(a):
                        continue
                    end = a.end_time
                    if a.state == AllocationState.PREEMPTED and a.grace_end_time is not None:
                        end = a.grace_end_time  # it held its GPUs through the grace
                    if end is not None:
                        ended.append((end, a))
                for end, a in sorted(ended, key=lambda e: (e[0], e[1].id)):
                    vec = Amount.of_placed(a, {}).vector()
                    history.ended(a.tenant, vec, a.allocate_time or end, end)
            self._history = history
        return self._history

    def freed(self, a: Allocation) -> None:
        """`a` gives its capacity back (before its state says so)."""
        history = self.usage_history()
        if history.decay and a.allocate_time is not None:
            vec = Amount.of_placed(a, {}).vector()
            history.ended(a.tenant, vec, a.allocate_time, self.engine.clock.now())
        self._follow(a, -1)
        self._leaving_ids.discard(a.id)
        if self._build is not None and self._build.ledger:
            self._build.ops.append((_GONE, a, 0))
        self._unsettle()

    def _taken(self, a: Allocation) -> None:
        """A pass placed `a`."""
        self._follow(a, +1)
        self._running(a)

    def _leaving(self, victim: Allocation) -> None:
        """A pass preempted `victim`; while it keeps its capacity (grace) it is leaving."""
        ledger = self._quick_ledger
        if not self.state.holds(victim):
            return
        if ledger is None:
            if self._build is not None and self._build.ledger:
                self._build.ops.append((_LEAVING, victim, 0))
            return
        ledger.add_leaving(victim.tenant, Amount.of_placed(victim, ledger.gpu_models))
        self._leaving_ids.add(victim.id)

    def _running(self, a: Allocation) -> None:
        if self._min_priority is None or a.priority < self._min_priority:
            self._min_priority = a.priority
        if self._first_start is None:
            self._first_start = a.allocate_time or self.engine.clock.now()

    def _unsettle(self) -> None:
        if not self._pending:
            return  # nobody waits, so no pass could do better than a quick decision
        self.epoch += 1
        self.request(urgent=True)

    def pending(self, allocation_id: str, *, considered: bool) -> None:
        """A new PENDING allocation; not `considered`: the next pass must see it first."""
        if allocation_id not in self._pending_tenant:
            a = self.state.allocations.get(allocation_id)
            tenant = a.tenant if a is not None else ""
            self._pending_tenant[allocation_id] = tenant
            self.pending_of[tenant] = self.pending_of.get(tenant, 0) + 1
        self._pending.add(allocation_id)
        if not considered:
            self._unconsidered.add(allocation_id)

    def request(self, *, urgent: bool = True) -> int:
        """Asks for a pass; returns a ticket `wait` can wait on."""
        self._requested += 1
        self._urgent = self._urgent or urgent
        self._kick.set()
        return self._requested

    async def wait(self, ticket: int) -> None:
        """Until a pass that started after `ticket` was taken has committed."""
        if self._done >= ticket:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((ticket, fut))
        await fut

    async def run_now(self) -> None:
        """A pass, committed, and the start-time estimates it began (if due) handed over."""
        await self.wait(self.request())
        await self.runner.estimates_made()

    @property
    def pending_total(self) -> int:
        return len(self._pending_tenant)

    @property
    def settled(self) -> bool:
        return self.epoch == self._settled_epoch and not self._unconsidered

    def forget(self, allocation_id: str, *, by_pass: bool = False) -> None:
        """`allocation_id` is no longer pending (`by_pass`: a pass placed it, and that
        pass saw what was set aside or held for it as free already)."""
        tenant = self._pending_tenant.pop(allocation_id, None)
        if tenant is not None:
            left = self.pending_of[tenant] - 1
            if left:
                self.pending_of[tenant] = left
            else:
                del self.pending_of[tenant]
        self._pending.discard(allocation_id)
        self._unconsidered.discard(allocation_id)
        self._reason_at.pop(allocation_id, None)
        self._firsts.pop(allocation_id, None)
        self._changes.pop(allocation_id, None)  # its `_due` entry is dropped when popped
        if self._unwait(allocation_id) and not by_pass:
            self._unsettle()  # what was kept for it may let other pending work fit

    def _unwait(self, allocation_id: str) -> bool:
        """What the quick view set aside or held for `allocation_id` goes, as a view built
        afresh would leave it out now that it no longer waits. True if it had any."""
        if self._quick is None:
            return False
        view = self._quick[0]
        asides = self._asides
        held = allocation_id in view.holders
        owns = asides is not None and asides.owns(allocation_id)
        if not held and not owns:
            return False
        if self._reserved:
            self._invalidate(ledger=False)  # set-asides sit under what is withheld
            return True
        st = view.statement()  # committed at once: keeps the view's undo journal empty
        if owns:
            assert asides is not None
            asides.drop(allocation_id)
        if held:
            self._hold_gangs(view)
        st.commit()
        self._explained.clear()
        return True

    def position(self, allocation_id: str) -> int:
        """Where a pending request stands in admission order (0: not placed by a pass yet)."""
        return self.positions.get(allocation_id, 0)

    # -- the loop --------------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            pending = bool(self._last_pending or self._unconsidered)
            await self._kicked(REFRESH_EVERY if pending else None)
            # Only a refresh: leave the CPU to serving for a moment first (only an urgent
            # request cuts the wait short: the non-urgent ones of a stream of arrivals
            # ran passes back to back, a whole core), and the longer passes take, the
            # longer: refreshes never take more than a third of the time.
            every = max(REFRESH_GAP, 2 * self.last_cycle_seconds)
            until = self._last_pass_end + every
            while not self._urgent and (gap := until - time.monotonic()) > 0:
                self._kick.clear()
                await self._kicked(gap)
            self._kick.clear()
            self._urgent = False
            # Let a burst of requests arrive so one pass serves them all.
            await asyncio.sleep(0)
            ticket = self._requested
            try:
                commit = await self._pass()
            except Unavailable as exc:
                self._release(ticket, exc)
                return
            except Exception:
                # A bug in the core must not take the server down with it: answer the
                # waiting callers, keep serving, and try again on the next change.
                log.exception("scheduling pass failed")
                commit = None
            if commit is not None:
                try:
                    await self.engine.committer.wait(commit)
                except Unavailable as exc:
                    self._release(ticket, exc)
                    return
            self._last_pass_end = time.monotonic()
            self._done = ticket
            self._release(ticket)

    def close(self) -> None:
        """At engine stop: no more reason slices (the store is closing) and no worker."""
        if self.next_slice is not None:
            self.next_slice.cancel()
            self.next_slice = None
        self.runner.close()

    async def _kicked(self, timeout: float | None) -> None:
        """Until a pass is asked for, or `timeout` seconds pass."""
        await set_or_timeout(self._kick, timeout)

    def _release(self, ticket: int, error: BaseException | None = None) -> None:
        keep = []
        for wanted, fut in self._waiters:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(Unavailable(f"the store failed: {error}"))
            elif wanted <= ticket:
                fut.set_result(None)
            else:
                keep.append((wanted, fut))
        self._waiters = keep

    def _estimated(self, estimates: dict[str, tuple[float | None, str]]) -> None:
        """Estimates made after a pass (status: no event, no revision)."""
        self.estimates = estimates

    def snapshot(self) -> Snapshot:
        """The read model's private copies at this moment: safe to read from a thread."""
        now = self.engine.clock.now()
        return Snapshot(
            now=now,
            nodes=dict(self.state.frozen_nodes),
            allocations=dict(self.state.frozen),
            quotas=dict(self.state.quotas),
            config=self.engine.config,
            ended_usage=self.usage_history().values(now),
            reservations={
                r.id: dataclasses.replace(r)
                for r in self.state.reservations.values()
                if not r.state.terminal
            },
            budgets=self.engine.cost.budgets_left(now),
            prices=self.engine.cost.prices,
        )

    async def _pass(self) -> Txn:
        """One full pass; returns its txn, to await its commit."""
        epoch = self.epoch
        # Quota as the plan saw it: re-checked at apply time only if this changes.
        marks = (self.engine.quotas_version, self._quick_placed)
        seen: set[str] = set()
        graced: list[str] = []

        def take() -> Snapshot:
            # Called by the runner when it is ready: what the pass will have seen.
            nonlocal epoch, marks, seen, graced
            # Deadlines already past are handled first: a grace over by the snapshot's
            # clock but not yet by the timer loop (late while the loop was busy) would
            # otherwise look free to the pass and still held to the apply, which then
            # refuses the plan that used it (and its request waits unranked a pass).
            with contextlib.suppress(Unavailable):
                self.engine.fire_timers()
            snap = self.snapshot()
            epoch = self.epoch
            marks = (self.engine.quotas_version, self._quick_placed)
            seen = {aid for aid in self._unconsidered if aid in snap.allocations}
            graced, self.graced = self.graced, []
            return snap

        with telemetry.tracer().start_as_current_span("rmgrpc.scheduling_cycle") as span:
            result = await self.runner.run(self.state, take)
            self.last_cycle_seconds = result.seconds
            span.set_attribute("rmgrpc.pending", result.pending)
            span.set_attribute("rmgrpc.admitted", len(result.plan.admissions))
            span.set_attribute("rmgrpc.preempted", len(result.plan.preemptions))
        self.passes += 1
        recheck = marks != (self.engine.quotas_version, self._quick_placed)
        txn = self._apply(result, graced, recheck_quota=recheck)
        if epoch == self.epoch:
            self._settled_epoch = epoch
        else:
            self.request()  # the plan was made on an older state: decide again
        self._unconsidered -= seen
        for observe in self.observers:
            observe(self.last_cycle_seconds, result)
        return txn

    def _apply(self, result: PassResult, graced: Sequence[str], *, recheck_quota: bool) -> Txn:
        decisions = result.plan
        engine = self.engine
        tr = engine.transitions
        state = self.state
        with engine.committer.transaction() as txn:
            decisions, off = self._against_reservations(decisions)
            applied = apply.apply_plan(
                state,
                decisions,
                engine.clock.now(),
                engine.config,
                quota_ok=self._quota_check() if recheck_quota else None,
            )
            applied.refused.extend(off)
            for victim in applied.preempted:
                tr.preempted(txn, victim)
                self._leaving(victim)
            for a in applied.placed:
                self.forget(a.id, by_pass=True)  # before its placements are taken
                tr.placed(txn, a)
                self._taken(a)
            for aid, why in applied.refused:
                log.info("plan for %s refused at apply time: %s", aid, why)
                self._unconsidered.add(aid)
            if applied.refused:
                self.request()
            self.positions = result.positions
            if result.estimates is not None:
                self.estimates = result.estimates
            self._last_pending = result.pending
            self._statuses(txn, result.reasons)
            for aid in graced:
                gone = state.live.get(aid)
                if gone is not None and gone.state == AllocationState.PREEMPTED:
                    state.free(gone)
        holds_moved = (decisions.held_nodes, decisions.reserved) != (
            self._last.held_nodes,
            self._last.reserved,
        )
        self._last = decisions
        if holds_moved:
            self._holds_moved()
        if applied.placed or applied.preempted:
            log.debug("pass placed %d, preempted %d", len(applied.placed), len(applied.preempted))
        return txn

    def _against_reservations(
        self, decisions: Decisions
    ) -> tuple[Decisions, list[tuple[str, str]]]:
        """Admissions that would break a reservation accepted (or begun) since the pass's
        snapshot are refused, as the plan applier refuses what no longer holds."""
        state = self.state
        live = {r.id: r for r in state.reservations.values() if not r.state.terminal}
        if not live or not decisions.admissions:
            return decisions, []
        reserved = Reserved(live, state.nodes, state.holding(), self.engine.clock.now())
        kept, off = [], []
        for adm in decisions.admissions:
            a = state.live.get(adm.allocation_id)
            why = reserved.conflict(a, adm.placements) if a is not None else None
            if why is None:
                kept.append(adm)
            else:
                off.append((adm.allocation_id, why))
        if not off:
            return decisions, []
        return dataclasses.replace(decisions, admissions=kept), off

    def _quota_check(self) -> apply.QuotaCheck:
        """Quota as it is now, for plans made before a quota changed or before work was
        placed by quick decisions during the pass."""
        ledger: Ledger | None = None

        def ok(a: Allocation, placements: Sequence[Placement]) -> bool:
            nonlocal ledger
            if ledger is None:
                ledger = self._ledger(self.state.holding())
            amt = Amount.of_placed(
                dataclasses.replace(a, placements=tuple(placements)), ledger.gpu_models
            )
            if ledger.limit_block(a.tenant, amt) is not None:
                return False
            ledger.add_held(a.tenant, amt)
            return True

        return ok

    def _statuses(self, txn: Txn, changed: dict[str, str]) -> None:
        """Takes a pass's changed reasons and writes the first slice of what is ready;
        the rest follows in slices of their own, with the event loop free between them.
        Changes held back by the rate limit are kept and written once due, by a later
        pass (which names only new changes).

        They are taken in `ABSORB_SLICE` at a time too. What is left of an older pass's
        is dropped: this pass's name every difference from a newer snapshot, which
        already has whatever the older pass's reasons wrote."""
        started = time.perf_counter()
        self._absorbing = iter(changed.items())
        self._absorb()
        self._budget = REASON_BUDGET
        if self._write_reasons(txn) or self._absorbing is not None:
            self._next_slice(started)

    def _absorb(self) -> None:
        """Takes the next `ABSORB_SLICE` of the last pass's changed reasons into the
        first reasons and the due changes."""
        taking = self._absorbing
        if taking is None:
            return
        live = self.state.live
        now = self.engine.clock.now()
        taken = 0
        for aid, reason in itertools.islice(taking, ABSORB_SLICE):
            taken += 1
            a = live.get(aid)
            if a is None or a.state != AllocationState.PENDING:
                continue
            if reason == a.pending_reason:
                # Already said (a quick decision gave it): nothing to write, and an older
                # change still waiting its turn is no longer what the passes say.
                self._changes.pop(aid, None)
                continue
            if a.pending_reason in ("", QUEUED):
                self._firsts[aid] = reason
                continue
            if aid not in self._changes:
                last = self._reason_at.get(aid)
                due = now if last is None else last + REASON_EVERY
                heapq.heappush(self._due, (due, aid))
            self._changes[aid] = reason
        if taken < ABSORB_SLICE:
            self._absorbing = None

    def _write_reasons(self, txn: Txn) -> bool:
        """Writes at most `REASON_SLICE` wanted reasons into `txn`: first reasons, then
        changes that are due, within the pass's `REASON_BUDGET`. Each is encoded on the
        event loop, so a queue of tens of thousands seen for the first time (as after a
        restart) is written slice by slice. Entries that turn out to need no write (ended,
        superseded) are bounded too: a slice looks at most at 4 x `REASON_SLICE` entries.
        True when more are ready for another slice.
        """
        live = self.state.live
        now = self.engine.clock.now()
        room = REASON_SLICE
        looks = 4 * REASON_SLICE
        firsts, changes, due = self._firsts, self._changes, self._due
        while firsts and room > 0 and looks > 0:
            looks -= 1
            aid, reason = firsts.popitem(last=False)
            a = live.get(aid)
            if a is None or a.state != AllocationState.PENDING or reason == a.pending_reason:
                continue
            self._write(txn, a, reason, now)
            room -= 1
        while due and room > 0 and looks > 0 and self._budget > 0 and due[0][0] <= now:
            looks -= 1
            _, aid = heapq.heappop(due)
            change = changes.pop(aid, None)
            a = live.get(aid)
            if change is None or a is None or a.state != AllocationState.PENDING:
                continue  # forgotten since: its entry was stale
            if change == a.pending_reason:
                continue
            self._write(txn, a, change, now)
            room -= 1
            self._budget -= 1
        return bool(firsts) or bool(due and self._budget > 0 and due[0][0] <= now)

    def _write(self, txn: Txn, a: Allocation, reason: str, now: float) -> None:
        a.pending_reason = reason
        self._reason_at[a.id] = now
        self.engine.transitions.allocation(txn, a, AllocationEventType.UPDATED)

    def _more_reasons(self) -> None:
        """The next slice of reasons taken in and written, in a txn of its own."""
        started = time.perf_counter()
        self.next_slice = None
        self._absorb()
        try:
            with self.engine.committer.transaction() as txn:
                more = self._write_reasons(txn)
        except Unavailable:
            return  # the store failed: the server is stopping
        if more or self._absorbing is not None:
            self._next_slice(started)

    def _next_slice(self, started: float) -> None:
        """Schedules the next slice of reasons after a pause as long as this one took,
        so reasons take at most half of the event loop: back to back, a pass's thousand
        changed reasons held every other RPC to one turn of the loop per slice (Health
        waited 80-170 ms behind them with 32 callers busy)."""
        if self.next_slice is not None:
            return  # one chain of slices at a time
        pause = time.perf_counter() - started
        self.next_slice = asyncio.get_running_loop().call_later(pause, self._more_reasons)

    # -- quick decisions -------------------------------------------------------------

    def _ledger(
        self,
        holding: Sequence[Allocation],
        nodes: Mapping[str, Node] | None = None,
        quotas: Mapping[str, Quota] | None = None,
    ) -> Ledger:
        """A ledger of what the state holds now. A victim whose grace the clock has
        passed still holds until its grace timer fires (and `freed` takes it out of the
        followed ledger then): the ledger is taken as of a time it still counts, or the
        followed ledger would take it out twice."""
        now = self.engine.clock.now()
        for a in holding:
            end = a.grace_end_time
            if a.state == AllocationState.PREEMPTED and end is not None and end <= now:
                now = end - 1e-6
        snap = Snapshot(
            now=now,
            nodes=self.state.nodes if nodes is None else nodes,
            allocations={a.id: a for a in holding},
            quotas=self.state.quotas if quotas is None else quotas,
            config=self.engine.config,
        )
        return Ledger(snap)

    def _holds_moved(self) -> None:
        """A pass held other nodes for starving gangs, or set aside other capacity for
        preemptors: the quick view follows in place (rebuilding it, every node and every
        running allocation, stalled the event loop for 60-150 ms at 1,000 nodes) to what
        a fresh build would make of it. The ledger is unchanged either way."""
        if self._quick is None:
            return
        if self._reserved:
            self._invalidate(ledger=False)  # set-asides sit under what is withheld: rare
            return
        view = self._quick[0]
        asides = self._asides
        assert asides is not None  # built with the view
        st = view.statement()  # committed at once: keeps the view's undo journal empty
        asides.clear()
        self._hold_gangs(view)
        self._set_aside(asides)
        st.commit()
        self._explained.clear()
        # A fresh build would also look at what runs now (these only ever went down).
        self._running_bounds(self.state.holding_unordered())

    def _hold_gangs(self, view: CapacityView) -> None:
        """Holds, afresh, the last pass's held nodes of its gangs still PENDING."""
        view.lift_holds()
        for gang_id, node_ids in self._last.held_nodes.items():
            gang = self.state.live.get(gang_id)
            if gang is not None and gang.state == AllocationState.PENDING:
                present = [n for n in node_ids if n in view.nodes]
                view.hold(present, gang_id, gang.priority)

    def _set_aside(self, asides: SetAsides) -> None:
        """The last pass's set-asides of preemptors still PENDING, in its order."""
        live = self.state.live
        for pid, node_id, gpus, cpu, mem in self._last.reserved:
            p = live.get(pid)
            if p is not None and p.state == AllocationState.PENDING:
                asides.add(pid, node_id, gpus, cpu, mem)

    def _running_bounds(self, holding: Iterable[Allocation]) -> None:
        running = [a for a in holding if a.state == AllocationState.ALLOCATED]
        self._min_priority = min((a.priority for a in running), default=None)
        self._first_start = min((a.allocate_time or 0.0 for a in running), default=None)

    def _build_view(
        self, holding: Sequence[Allocation]
    ) -> tuple[CapacityView, SetAsides, Reserved | None]:
        """The quick view built afresh: what `holding` leaves free, the last pass's holds
        for gangs and set-asides for preemptors still waiting, and reserved capacity
        withheld, in that order (`_holds_moved` and `_follow` keep to what this makes)."""
        view = CapacityView(self.state.nodes, holding)
        return (view, *self._lay_on(view, holding))

    def _lay_on(
        self, view: CapacityView, holding: Sequence[Allocation]
    ) -> tuple[SetAsides, Reserved | None]:
        """Onto a view of what `holding` leaves free: the last pass's holds for gangs and
        set-asides for preemptors still waiting, then reserved capacity withheld."""
        self._hold_gangs(view)
        asides = SetAsides(view)
        self._set_aside(asides)
        return asides, self._withhold_reserved(view, holding)

    def _withhold_reserved(
        self, view: CapacityView, holding: Sequence[Allocation]
    ) -> Reserved | None:
        """Between passes nothing backfills: idle reserved capacity is withheld whole."""
        state = self.state
        live = {r.id: r for r in state.reservations.values() if not r.state.terminal}
        if not live:
            return None
        reserved = Reserved(live, state.nodes, holding, self.engine.clock.now())
        reserved.withhold(view)
        return reserved

    async def quick_ready(self) -> None:
        """Has the quick view and ledger built, off the event loop, before a request is
        decided: built on the loop they held it ~70 ms at 1,000 nodes and 8,000 running
        allocations (after a start, and after each node or quota change). The build
        reads the state's frozen copies in a thread while the loop goes on; what is held
        meanwhile is recorded and followed when it is installed. A build made stale by
        a node or quota change is started again (twice at most; then `_structures`
        builds on the loop, as it does for any caller that does not wait here)."""
        for _ in range(3):
            if self._quick is not None:
                return
            build = self._build or self._start_build()
            await asyncio.shield(build.done)

    def _start_build(self) -> _Build:
        state = self.state
        frozen = state.frozen
        holding = [frozen.get(a.id) or dataclasses.replace(a) for a in state.holding()]
        build = _Build(ledger=self._quick_ledger is None)
        nodes = dict(state.frozen_nodes)
        quotas = dict(state.quotas)

        def make() -> tuple[CapacityView, Ledger | None]:
            # In a worker thread, from copies no one changes.
            view = CapacityView(nodes, holding)
            return view, self._ledger(holding, nodes, quotas) if build.ledger else None

        async def run() -> None:
            try:
                view, ledger = await asyncio.to_thread(make)
            except Exception:
                log.exception("building the quick view failed; it is built on the loop")
                if self._build is build:
                    self._build = None
                return
            if self._build is build:
                self._build = None
                if self._quick is None:
                    self._install(build, view, ledger, holding)

        self._build = build
        build.done = asyncio.ensure_future(run())
        return build

    def _install(
        self,
        build: _Build,
        view: CapacityView,
        ledger: Ledger | None,
        holding: Sequence[Allocation],
    ) -> None:
        """A built view (and ledger) brought up to now: what was taken and given back
        since its copies were made, then the last pass's holds and set-asides and the
        reservations (`_lay_on`, as for a view built on the spot)."""
        leaving = {a.id for a in holding if a.state == AllocationState.PREEMPTED}
        st = view.statement()  # committed at once: keeps the view's undo journal empty
        for op, a, sign in build.ops:
            if op == _FOLLOW:
                for p in a.placements:
                    change = view.take if sign > 0 else view.give
                    change(p.node_id, p.gpu_indices, a.shape.cpu_millis, a.shape.memory_bytes)
            if ledger is None:
                continue
            if op == _FOLLOW:
                _follow_ledger(ledger, leaving, a, sign)
            elif op == _LEAVING:
                ledger.add_leaving(a.tenant, Amount.of_placed(a, ledger.gpu_models))
                leaving.add(a.id)
            else:
                leaving.discard(a.id)
        st.commit()
        if ledger is not None:
            self._quick_ledger = ledger
            self._leaving_ids = leaving
        assert self._quick_ledger is not None
        now_holding = self.state.holding()
        self._asides, self._reserved = self._lay_on(view, now_holding)
        self._quick = (view, self._quick_ledger)
        self._running_bounds(now_holding)
        self._explained.clear()

    def _structures(self) -> tuple[CapacityView, Ledger]:
        if self._quick is None:
            self._build = None  # built here and now: one in flight is of no use
            holding = self.state.holding()
            view, self._asides, self._reserved = self._build_view(holding)
            if self._quick_ledger is None:
                self._quick_ledger = self._ledger(holding)
                # The ledger counts victims still in their grace as leaving.
                self._leaving_ids = {a.id for a in holding if a.state == AllocationState.PREEMPTED}
            self._quick = (view, self._quick_ledger)
            self._running_bounds(holding)
        return self._quick

    def _may_preempt(self, a: Allocation, amt: Amount, ledger: Ledger) -> bool:
        """Could a pass preempt for `a` by priority or to honour its guarantee? Then it
        waits for that pass, and so does everything after it. (Fair-share reclaim is left
        to the next pass without holding anyone up.)"""
        if self._min_priority is None or self._first_start is None:
            return False
        if self._first_start > self.engine.clock.now() - self.engine.config.min_runtime_seconds:
            return False  # nothing has run long enough to be preempted
        return a.priority > self._min_priority or ledger.within_guarantee(a.tenant, amt)

    def decide(self, a: Allocation) -> tuple[Placement, ...] | str | None:
        """A quick decision for a new request: its placements, or the reason it waits;
        None when it must wait for the next pass.

        A request that fits waits for the pass when the queue is not settled: capacity
        just freed, or requests not yet considered, may be owed to older work. One that
        does not fit (and could not preempt) is answered PENDING at once either way,
        since it takes nothing from anyone; otherwise a steady stream of arrivals into
        a full cluster would keep the queue unsettled, every answer waiting a pass."""
        if a.reservation_id:
            return None  # placed by a pass, inside its reservation
        settled = self.settled
        view, ledger = self._structures()
        amt = Amount.of_request(a)
        block = ledger.limit_block(a.tenant, amt)
        if block is not None:
            if self._min_priority is not None and a.priority > self._min_priority:
                return None  # a pass may preempt lower-priority work within the quota
            return block.text()
        lent = ledger.lending_block(a.tenant, amt)
        if lent is not None:
            return lent
        models: tuple[str, ...] | None = None
        if a.shape.gpus > 0 and not a.shape.gpu_model:
            models = ledger.allowed_models(a.tenant, amt.gpus, view.models)
            if models == ():
                return (
                    f"over quota of tenant {a.tenant}: no GPU model has room for "
                    f"{gpus_text(amt.gpus)} under its per-model limits"
                )
        trial = view.statement()
        placements = view.place_gang(
            a.shape, a.count, owner=a.id, priority=a.priority, models=models
        )
        if placements is not None and not settled:
            trial.discard()
            return None
        trial.commit()
        if placements is None:
            if self._may_preempt(a, amt, ledger):
                return None
            self.request(urgent=False)  # for its position, and fair-share reclaim
            held = bool(view.holders)
            key = (a.shape, a.count, models, a.priority if held else 0, a.id if held else "")
            text = self._explained.get(key)
            if text is None:
                ex = view.explain(a.shape, a.count, owner=a.id, priority=a.priority, models=models)
                text = self._explained[key] = ex.text()
            # Ended as the last pass ended this tenant's reasons: the next pass would
            # otherwise write a second event for every arrival only to add the note.
            note = self._last.share_notes.get(a.tenant, "") if a.shape.gpus > 0 else ""
            return f"{text}; {note}" if note else text
        self._quick_placed += 1
        self._explained.clear()
        self._running(a)
        placed = dataclasses.replace(a, placements=placements)
        ledger.add_held(a.tenant, Amount.of_placed(placed, ledger.gpu_models))
        return placements

    def never_fits(self, a: Allocation) -> str | None:
        """Why no registered node could ever host `a` (the filter chain's static part)."""
        return self._structures()[0].never_fits(a.shape, a.count)

    # -- dry runs --------------------------------------------------------------------

    async def dry_run(self, probe: Allocation) -> DryRun:
        """What `probe` would get now: one pass with it added, where passes run.
        The same request asked again at the same revision shares the answer."""
        key = (self.engine.committer.revision, _probe_key(probe))
        fut = self._dry_runs.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self.runner.dry_run(self.state, self.snapshot, probe))
            self._dry_runs[key] = fut
            fut.add_done_callback(lambda _: self._dry_runs.pop(key, None))
        return await asyncio.shield(fut)


def _follow_ledger(ledger: Ledger, leaving: set[str], a: Allocation, sign: int) -> None:
    """`a` takes (+1) or gives back (-1) what it holds in `ledger`; one of the victims in
    `leaving` giving back stops counting as leaving."""
    amt = Amount.of_placed(a, ledger.gpu_models)
    ledger.add_held(a.tenant, amt, sign)
    if sign < 0 and a.id in leaving:
        ledger.add_leaving(a.tenant, amt, -1)


# What happened to the held capacity while a quick view was being built (`_Build.ops`).
_FOLLOW, _LEAVING, _GONE = 0, 1, 2


@dataclasses.dataclass(eq=False)
class _Build:
    """A quick view (and, if `ledger`, a quick ledger) being built in a worker thread:
    `ops` records, in order, what took or gave back capacity since its copies were made
    (`_FOLLOW` with +1/-1), and, for the ledger, victims that began leaving (`_LEAVING`)
    or stopped holding (`_GONE`)."""

    ledger: bool
    ops: list[tuple[int, Allocation, int]] = dataclasses.field(default_factory=list)
    done: asyncio.Future[None] = dataclasses.field(init=False)


def _probe_key(a: Allocation) -> object:
    return (a.tenant, a.count, a.shape, a.priority, a.max_duration_seconds, a.seq)
