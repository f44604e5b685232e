"""The engine's core: what every command shares, the engine's life cycle and its loops.

Owns the parts and wires them: the read model (`state`), the committer (revisions,
txns, durability), the watch fan-out (`hub`, fed by the store after each commit), the
deadlines (`timers`), the transitions, and the scheduling loop. Background loops
(timers, compaction) survive their own errors; a failed commit stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from rmgrpc.clock import Clock, set_or_timeout
from rmgrpc.config import Settings
from rmgrpc.engine.cost import Costs
from rmgrpc.engine.recovery import recover
from rmgrpc.engine.scheduling import CycleObserver, Scheduling
from rmgrpc.engine.timers import Timers
from rmgrpc.engine.transitions import Transitions
from rmgrpc.engine.txn import Committer, Txn
from rmgrpc.errors import NotFound, Unavailable
from rmgrpc.events import EventHub
from rmgrpc.model import AllocationState, EventKind, Node, NodeState
from rmgrpc.state import ClusterState
from rmgrpc.store import EventStore

log = logging.getLogger("rmgrpc.engine")

T = TypeVar("T")

# How long stop() waits for the cancelled background loops to end.
STOP_LOOPS_SECONDS = 5.0


class EngineCore:
    def __init__(self, settings: Settings, store: EventStore, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.config = settings.scheduler_config()
        self.state = ClusterState()
        self.hub = EventHub(
            store.read_events,
            last_revision=store.last_revision,
            oldest_revision=store.oldest_revision,
            ring_max_bytes=settings.event_ring_max_bytes,
            buffer_limit=settings.watch_buffer_events,
            max_lag_events=settings.watch_max_lag_events,
            max_lag_seconds=settings.watch_max_lag_seconds,
        )
        self.committer = Committer(store, self.hub, clock)
        # Watchers see an event only once it is durable: the store calls back after commit.
        store.on_commit = self.committer.on_commit
        self._timer_wake = asyncio.Event()
        self.timers = Timers(clock, self._timer_wake.set)
        self.transitions = Transitions(self.state, self.committer, self.timers, clock)
        self.scheduling = Scheduling(self)
        self.transitions.on_node_change = self.scheduling.changed
        self.transitions.on_freed = self.scheduling.freed
        self.cost = Costs(self)
        self.transitions.on_ending = self.cost.ending
        # Bumped by every quota change: plans made before one re-check quota.
        self.quotas_version = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- what callers read -------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The newest revision handed out; answers name it only once durable."""
        return self.committer.revision

    @property
    def failed(self) -> BaseException | None:
        return self.committer.failed

    @property
    def cycle_observers(self) -> list[CycleObserver]:
        return self.scheduling.observers

    @property
    def commit_observers(self) -> list[Callable[[float], None]]:
        return self.committer.observers

    @property
    def last_cycle_seconds(self) -> float:
        return self.scheduling.last_cycle_seconds

    async def found(self, lookup: Callable[[], T]) -> T:
        """`lookup()`, whose NOT_FOUND is answered only once what it saw is durable: a
        delete still being committed must not be reported gone before a crash could no
        longer bring it back."""
        revision = self.committer.revision
        try:
            return lookup()
        except NotFound:
            await self.wait_committed(revision)
            raise

    async def wait_committed(self, revision: int | None = None) -> int:
        """Waits until `revision` (default: everything so far) is durable; returns it."""
        return await self.committer.wait_durable(revision)

    # -- life cycle --------------------------------------------------------------------

    async def start(self, inventory: Sequence[Node] = ()) -> None:
        """Rebuilds the state from the store, adds missing inventory nodes, starts the loops."""
        loaded = await self.store.load()
        self.state = recover(loaded, self.store.path, self.settings, self.clock.now())
        self.transitions.state = self.state
        self.scheduling.state = self.state
        self.cost.load(loaded, self.store.path)
        tr = self.transitions
        for a in self.state.live.values():
            tr.arm(a)
            if a.state == AllocationState.PENDING:
                self.scheduling.pending(a.id, considered=False)
        for node in self.state.nodes.values():
            tr.arm_node(node)
        self.arm_reservations()
        configured = {node.id for node in inventory}
        with self.committer.transaction() as txn:
            for node in list(self.state.nodes.values()):
                if node.simulated and node.id not in configured:
                    tr.remove_node(txn, node, "no longer in the configured simulated inventory")
            for node in inventory:
                if node.id not in self.state.nodes:
                    tr.node(txn, node)
        await self.committer.wait(txn)
        self._tasks = [
            asyncio.create_task(self.scheduling.loop(), name="rmgrpc-scheduler"),
            asyncio.create_task(self._timer_loop(), name="rmgrpc-timers"),
            asyncio.create_task(self._compaction_loop(), name="rmgrpc-compaction"),
            asyncio.create_task(self.cost.loop(), name="rmgrpc-cost"),
        ]
        self.scheduling.changed()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a loop that swallowed its cancellation must not hang the stop.
            ended, stuck = await asyncio.wait(self._tasks, timeout=STOP_LOOPS_SECONDS)
            for task in ended:
                if not task.cancelled() and task.exception() is not None:
                    log.error("engine loop %s had failed: %r", task.get_name(), task.exception())
            for task in stuck:
                log.error("engine loop %s did not stop when cancelled", task.get_name())
        self._tasks = []
        self.scheduling.close()
        self.hub.close()
        self.committer.close()

    async def schedule_now(self) -> None:
        """Runs a scheduling pass (coalesced with any pending one) and waits for its commit
        (and for the start-time estimates it began, if they were due)."""
        await self.scheduling.run_now()

    # -- timers ------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake.clear()
            try:
                self.fire_timers()
            except Unavailable:
                return  # the store failed: the server is stopping
            except Exception:
                # A bug in one deadline must not stop every other lease from expiring.
                log.exception("timer handling failed")
            delay = self.timers.next_delay()
            if delay is None or delay > 0:
                await set_or_timeout(self._timer_wake, min(delay or 3600.0, 1.0))

    def fire_timers(self, now: float | None = None) -> bool:
        """Handles every deadline that has come (by the monotonic clock); True when
        anything changed. Its changes are one txn, committed in the background.

        `now` is accepted for callers that moved a manual clock; the clock decides."""
        del now
        due = self.timers.due()
        if not due:
            return False
        changed = False
        tr = self.transitions
        with self.committer.transaction() as txn:
            for kind, object_id in due:
                if kind == "node":
                    changed |= self._node_lease_lapsed(txn, object_id)
                    continue
                if kind in ("rstart", "rend"):
                    changed |= self.reservation_due(txn, kind, object_id)
                    continue
                a = self.state.live.get(object_id)
                if a is None:
                    continue
                if kind == "lease" and a.state == AllocationState.ALLOCATED:
                    why = f"lease not renewed within {a.lease_seconds} s"
                    tr.end(txn, a, AllocationState.EXPIRED, why)
                    changed = True
                elif kind == "max" and a.state == AllocationState.ALLOCATED:
                    tr.end(
                        txn,
                        a,
                        AllocationState.EXPIRED,
                        f"ran past max_duration_seconds ({a.max_duration_seconds} s)",
                    )
                    changed = True
                elif kind == "grace" and a.state == AllocationState.PREEMPTED:
                    # The victim stays in the next snapshot (holding nothing) so the pass
                    # hands what it freed to its preemptor first.
                    tr.grace_over(txn, a)
                    self.scheduling.graced.append(a.id)
                    changed = True
        return changed

    # Reservations (`engine.reservations`) fill these in.

    def arm_reservations(self) -> None:
        """Arms the window deadlines of every reservation recovered at start."""

    def reservation_due(self, txn: Txn, kind: str, reservation_id: str) -> bool:
        """A reservation's window began ("rstart") or ended ("rend"); True if it changed."""
        return False

    def _node_lease_lapsed(self, txn: Txn, node_id: str) -> bool:
        node = self.state.nodes.get(node_id)
        if node is None or node.state == NodeState.DOWN or node.lease_expire_time is None:
            return False
        node.state = NodeState.DOWN
        node.state_reason = f"no heartbeat for {self.settings.node_lease_seconds:g} s"
        self.transitions.node(txn, node)
        log.warning("node %s DOWN: %s; its work is LOST", node_id, node.state_reason)
        self.transitions.lose_work_on(txn, node_id, f"node {node_id} went DOWN")
        return True

    # -- compaction --------------------------------------------------------------------

    async def _compaction_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.compaction_interval_seconds)
            try:
                await self.compact()
            except Unavailable:
                return
            except Exception:
                log.exception("compaction failed; retrying at the next interval")

    async def compact(self) -> None:
        """Trims the event log by count and age, and forgets long-ended allocations and
        reservations."""
        now = self.clock.now()
        oldest = await self.store.compact(
            max_events=self.settings.retention_max_events,
            min_time=now - self.settings.retention_max_age_seconds,
        )
        self.hub.compacted(oldest)
        horizon = now - self.settings.allocation_retention_seconds
        with self.committer.transaction() as txn:
            for a in list(self.state.in_order()):
                ended = a.state.terminal and a.id not in self.state.live
                if ended and (a.end_time or now) < horizon:
                    self.state.forget(a)
                    txn.deletes.append((EventKind.ALLOCATION, a.id))
            # Reservations ended or cancelled are kept as long, counted from their window's end.
            for r in list(self.state.reservations.values()):
                if r.state.terminal and r.end_time < horizon:
                    del self.state.reservations[r.id]
                    txn.deletes.append((EventKind.RESERVATION, r.id))
        await self.committer.wait(txn)
