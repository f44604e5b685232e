"""The engine: every change to the cluster goes through here.

One path for every write: validate against the state, mutate the in-memory state,
append an event (which takes the next revision), commit state and events in one
store transaction (group-committed with concurrent writers), and only then let
watchers see it (the store's commit callback feeds the EventHub). The scheduler
loop runs the pure core on a snapshot whenever something changed, coalescing
bursts, and commits each cycle's decisions in one transaction. Timers expire
leases, end preemption grace periods and take silent nodes DOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from rmgrpc import codec, telemetry
from rmgrpc.clock import Clock
from rmgrpc.config import Settings
from rmgrpc.errors import (
    FailedPrecondition,
    NotFound,
    QuotaExceeded,
    QuotaViolation,
    Unavailable,
)
from rmgrpc.events import EventHub
from rmgrpc.model import (
    Allocation,
    AllocationEventType,
    AllocationState,
    Event,
    EventKind,
    GpuHealth,
    GpuMetrics,
    Node,
    NodeState,
    Quota,
)
from rmgrpc.scheduler import cycle as scheduler_cycle
from rmgrpc.scheduler import fairshare
from rmgrpc.scheduler.snapshot import Decisions, DryRun, Snapshot
from rmgrpc.state import ClusterState
from rmgrpc.store import Store, Write
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2, quota_pb2

log = logging.getLogger("rmgrpc.engine")

CycleObserver = Callable[[float, Decisions], None]


@dataclass(slots=True)
class GpuReport:
    index: int
    health: GpuHealth | None
    metrics: GpuMetrics | None


class Engine:
    """Owns the cluster state. Servicers call its methods; nothing else writes state."""

    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.state = ClusterState()
        self.config = settings.scheduler_config()
        self.hub = EventHub(
            store.read_events,
            last_revision=store.last_revision,
            oldest_revision=store.oldest_revision,
            buffer_limit=settings.watch_buffer_events,
        )
        self.revision = store.last_revision
        self._events: list[Event] = []
        self._puts: list[tuple[EventKind, str, bytes]] = []
        self._deletes: list[tuple[EventKind, str]] = []
        self._timers: list[tuple[float, int, str, str]] = []
        self._timer_seq = 0
        self._timer_wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._cycles_requested = 0
        self._cycles_done = 0
        self._cycle_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._commit_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Victims whose grace ended: dropped from the snapshot after the next cycle.
        self._graced: list[str] = []
        self.cycle_observers: list[CycleObserver] = []
        # Called with the seconds each commit took (metrics).
        self.commit_observers: list[Callable[[float], None]] = []
        self.last_cycle_seconds = 0.0
        self.failed: BaseException | None = None
        # Watchers see an event only once it is durable: the store calls back after commit.
        store.on_commit = self._on_commit

    # -- life cycle ----------------------------------------------------------

    async def start(self, inventory: Sequence[Node] = ()) -> None:
        """Rebuilds the state from the store, adds missing inventory nodes, starts the loops."""
        loaded = await self.store.load()
        now = self.clock.now()
        for data in loaded.objects.get(EventKind.NODE, {}).values():
            node = codec.node_from_proto(gpu_manager_pb2.Node.FromString(data))
            # Agents get a full lease after a restart to find the server again.
            if node.lease_expire_time is not None and node.state != NodeState.DOWN:
                node.lease_expire_time = now + self.settings.node_lease_seconds
            self.state.nodes[node.id] = node
        for data in loaded.objects.get(EventKind.QUOTA, {}).values():
            quota = codec.quota_from_proto(quota_pb2.Quota.FromString(data))
            self.state.quotas[quota.tenant] = quota
        for data in loaded.objects.get(EventKind.ALLOCATION, {}).values():
            a = codec.allocation_from_proto(allocator_pb2.Allocation.FromString(data))
            if a.state == AllocationState.ALLOCATED and a.lease_expire_time is not None:
                # Time the server was down does not count against a lease.
                a.lease_expire_time = max(
                    a.lease_expire_time,
                    now + min(a.lease_seconds, self.settings.node_lease_seconds),
                )
            self.state.add(a, now)
            if a.id in self.state.live:
                self._arm_allocation(a)
        for node in self.state.nodes.values():
            self._arm_node(node)
        configured = {node.id for node in inventory}
        for node in list(self.state.nodes.values()):
            if node.simulated and node.id not in configured:
                self._remove_node(node, "no longer in the configured simulated inventory")
        for node in inventory:
            if node.id not in self.state.nodes:
                self.state.nodes[node.id] = node
                self._emit_node(node)
        await self._flush()
        self._tasks = [
            asyncio.create_task(self._scheduler_loop(), name="rmgrpc-scheduler"),
            asyncio.create_task(self._timer_loop(), name="rmgrpc-timers"),
            asyncio.create_task(self._compaction_loop(), name="rmgrpc-compaction"),
        ]
        self.request_cycle()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self.hub.close()
        for _, fut in self._cycle_waiters + self._commit_waiters:
            if not fut.done():
                fut.cancel()

    # -- events and commits ------------------------------------------------

    def _next_revision(self) -> int:
        self.revision += 1
        return self.revision

    def _emit(
        self,
        kind: EventKind,
        type: int,
        object_id: str,
        encode: Callable[[int], bytes],
        tenant: str = "",
        node_ids: Iterable[str] = (),
        *,
        persist: bool = True,
    ) -> int:
        rev = self._next_revision()
        data = encode(rev)
        self._events.append(
            Event(rev, kind, type, object_id, self.clock.now(), data, tenant, tuple(node_ids))
        )
        if persist:
            self._puts.append((kind, object_id, data))
        return rev

    def _emit_allocation(self, a: Allocation, type: AllocationEventType) -> None:
        def encode(rev: int) -> bytes:
            a.revision = rev
            if not a.seq:
                a.seq = rev
            return codec.allocation_to_proto(a, self.state.uuid_of).SerializeToString()

        nodes = dict.fromkeys(p.node_id for p in a.placements)
        self._emit(EventKind.ALLOCATION, type, a.id, encode, a.tenant, nodes)

    def _emit_node(self, node: Node, *, removed: bool = False) -> None:
        def encode(rev: int) -> bytes:
            node.revision = rev
            return codec.node_to_proto(node).SerializeToString()

        self._emit(
            EventKind.NODE, int(node.state), node.id, encode, "", (node.id,), persist=not removed
        )
        if removed:
            self._deletes.append((EventKind.NODE, node.id))

    def _remove_node(self, node: Node, reason: str) -> None:
        self._lose_work_on(node.id, f"node {node.id} was removed: {reason}")
        node.state, node.state_reason = NodeState.DOWN, f"removed: {reason}"
        del self.state.nodes[node.id]
        self._emit_node(node, removed=True)

    def _emit_quota(self, quota: Quota, deleted: bool = False) -> None:
        def encode(rev: int) -> bytes:
            quota.revision = rev
            return codec.quota_to_proto(quota).SerializeToString()

        self._emit(
            EventKind.QUOTA,
            2 if deleted else 1,
            quota.tenant,
            encode,
            quota.tenant,
            persist=not deleted,
        )
        if deleted:
            self._deletes.append((EventKind.QUOTA, quota.tenant))

    async def _flush(self) -> None:
        """Commits everything emitted so far (shared with concurrent writers by the store)."""
        if not (self._events or self._puts or self._deletes):
            return
        write = Write(events=self._events, puts=self._puts, deletes=self._deletes)
        self._events, self._puts, self._deletes = [], [], []
        started = time.perf_counter()
        try:
            await self.store.commit(write)
            for observe in self.commit_observers:
                observe(time.perf_counter() - started)
        except Exception as exc:
            # The in-memory state is now ahead of the disk: stop rather than serve it.
            self.failed = exc
            log.critical("store commit failed, shutting down: %s", exc)
            raise Unavailable("the store failed; the server is shutting down") from exc

    def _on_commit(self, events: Sequence[Event]) -> None:
        self.hub.publish(events)
        if events:
            committed = events[-1].revision
            self._commit_waiters = _release(self._commit_waiters, committed)

    async def wait_committed(self, revision: int | None = None) -> None:
        """Waits until every change up to `revision` (default: all seen so far) is durable.

        Reads answer only after this, so no client ever sees (or lists at) a revision
        that a crash could take back."""
        if revision is None:
            revision = self.revision
        if self.hub.revision >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit_waiters.append((revision, fut))
        await fut

    # -- scheduling --------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            now=self.clock.now(),
            nodes=self.state.nodes,
            allocations=self.state.live,
            quotas=self.state.quotas,
            config=self.config,
        )

    def request_cycle(self) -> int:
        """Asks for a scheduling cycle; returns a ticket `_wait_cycle` can wait on."""
        self._cycles_requested += 1
        self._kick.set()
        return self._cycles_requested

    async def schedule_now(self) -> None:
        """Runs a scheduling cycle (coalesced with any pending one) and waits for its commit."""
        await self._wait_cycle(self.request_cycle())

    async def _wait_cycle(self, ticket: int) -> None:
        if self._cycles_done >= ticket:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._cycle_waiters.append((ticket, fut))
        await fut

    async def _scheduler_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            # Let a burst of requests arrive so one cycle serves them all.
            await asyncio.sleep(0)
            ticket = self._cycles_requested
            try:
                self.run_cycle_now()
            except Exception:
                # A bug in the core must not take the server down with it: answer the
                # waiting callers, keep serving, and try again on the next change.
                log.exception("scheduling cycle failed")
            try:
                await self._flush()
            except Exception as exc:
                self._cycle_waiters = _release(self._cycle_waiters, ticket, exc)
                return
            self._cycles_done = ticket
            self._cycle_waiters = _release(self._cycle_waiters, ticket)

    def run_cycle_now(self) -> Decisions:
        """One synchronous scheduling pass; its events are committed by the caller."""
        with telemetry.tracer().start_as_current_span("rmgrpc.scheduling_cycle") as span:
            started = time.perf_counter()
            snap = self.snapshot()
            decisions = scheduler_cycle.run_cycle(snap)
            self.last_cycle_seconds = time.perf_counter() - started
            self._apply(snap.now, decisions)
            for aid in self._graced:
                self.state.live.pop(aid, None)
            self._graced = []
            span.set_attribute("rmgrpc.pending", len(decisions.pending))
            span.set_attribute("rmgrpc.admitted", len(decisions.admissions))
            span.set_attribute("rmgrpc.preempted", len(decisions.preemptions))
        for observe in self.cycle_observers:
            observe(self.last_cycle_seconds, decisions)
        return decisions

    def _apply(self, now: float, decisions: Decisions) -> None:
        grace = self.config.preemption_grace_seconds
        # Victims first: with no grace period their GPUs go straight to the preemptor.
        for pre in decisions.preemptions:
            victim = self.state.live.get(pre.allocation_id)
            if victim is None or victim.state != AllocationState.ALLOCATED:
                continue
            self._preempt(victim, now, grace, pre.reason, pre.preemptor_id)
        for adm in decisions.admissions:
            a = self.state.live.get(adm.allocation_id)
            if a is None or a.state != AllocationState.PENDING:
                continue
            a.state = AllocationState.ALLOCATED
            a.placements = adm.placements
            a.allocate_time = now
            a.lease_expire_time = now + a.lease_seconds
            a.max_end_time = now + a.max_duration_seconds if a.max_duration_seconds else None
            a.pending_reason = ""
            a.queue_position = 0
            self.state.hold(a)
            self._emit_allocation(a, AllocationEventType.PLACED)
            self._arm_allocation(a)
        for aid, status in decisions.pending.items():
            a = self.state.live.get(aid)
            if a is not None and a.state == AllocationState.PENDING:
                a.pending_reason = status.reason
                a.queue_position = status.position

    def _preempt(
        self, victim: Allocation, now: float, grace: float, reason: str, preemptor: str = ""
    ) -> None:
        victim.state = AllocationState.PREEMPTED
        victim.state_reason = reason
        victim.preempted_by = preemptor
        victim.end_time = now
        victim.grace_end_time = now + grace
        if grace <= 0:
            self.state.free(victim)
        else:
            self._arm(victim.grace_end_time, "grace", victim.id)
        self._emit_allocation(victim, AllocationEventType.ENDED)

    def _end(self, a: Allocation, state: AllocationState, reason: str) -> None:
        a.state = state
        a.state_reason = reason
        a.end_time = self.clock.now()
        a.pending_reason = ""
        a.queue_position = 0
        self.state.free(a)
        self._emit_allocation(a, AllocationEventType.ENDED)

    # -- timers ------------------------------------------------------------

    def _arm(self, when: float, kind: str, object_id: str) -> None:
        self._timer_seq += 1
        first = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (when, self._timer_seq, kind, object_id))
        if first is None or when < first:
            self._timer_wake.set()

    def _arm_allocation(self, a: Allocation) -> None:
        if a.state == AllocationState.ALLOCATED:
            if a.lease_expire_time is not None:
                self._arm(a.lease_expire_time, "lease", a.id)
            if a.max_end_time is not None:
                self._arm(a.max_end_time, "max", a.id)
        elif a.state == AllocationState.PREEMPTED and a.grace_end_time is not None:
            self._arm(a.grace_end_time, "grace", a.id)

    def _arm_node(self, node: Node) -> None:
        if node.lease_expire_time is not None and node.state != NodeState.DOWN:
            self._arm(node.lease_expire_time, "node", node.id)

    async def _timer_loop(self) -> None:
        while True:
            self._timer_wake.clear()
            try:
                if self.fire_timers(self.clock.now()):
                    await self._flush()
            except Unavailable:
                return  # the store failed: the server is stopping
            except Exception:
                # A bug in one deadline must not stop every other lease from expiring.
                log.exception("timer handling failed")
            delay = self._timers[0][0] - self.clock.now() if self._timers else 3600.0
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._timer_wake.wait(), min(delay, 1.0))

    def fire_timers(self, now: float) -> bool:
        """Handles every deadline up to `now`; True when anything changed."""
        changed = False
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, object_id = heapq.heappop(self._timers)
            if kind == "node":
                changed |= self._node_lease_lapsed(object_id, now)
                continue
            a = self.state.live.get(object_id)
            if a is None:
                continue
            if kind == "lease" and a.state == AllocationState.ALLOCATED:
                if a.lease_expire_time is not None and a.lease_expire_time <= now:
                    self._end(
                        a, AllocationState.EXPIRED, f"lease not renewed within {a.lease_seconds} s"
                    )
                    changed = True
            elif kind == "max" and a.state == AllocationState.ALLOCATED:
                self._end(
                    a,
                    AllocationState.EXPIRED,
                    f"ran past max_duration_seconds ({a.max_duration_seconds} s)",
                )
                changed = True
            elif kind == "grace" and a.state == AllocationState.PREEMPTED:
                # The grace period is over: the GPUs go back to the scheduler. The victim
                # stays in the snapshot for one more cycle (holding nothing) so the core
                # hands what it freed to its preemptor first.
                self.state.free(a, keep_live=True)
                self._graced.append(a.id)
                changed = True
        if changed:
            self.request_cycle()
        return changed

    def _node_lease_lapsed(self, node_id: str, now: float) -> bool:
        node = self.state.nodes.get(node_id)
        if node is None or node.state == NodeState.DOWN or node.lease_expire_time is None:
            return False
        if node.lease_expire_time > now:
            return False
        node.state = NodeState.DOWN
        node.state_reason = f"no heartbeat for {self.settings.node_lease_seconds:g} s"
        self._emit_node(node)
        self._lose_work_on(node_id, f"node {node_id} went DOWN")
        return True

    def _lose_work_on(self, node_id: str, reason: str) -> None:
        """Placed allocations on the node become LOST; preempted ones in grace let go."""
        for a in self.state.on_node(node_id):
            if a.state == AllocationState.ALLOCATED:
                self._end(a, AllocationState.LOST, reason)
            else:
                self.state.free(a)

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
        """Trims the event log by count and age, and forgets long-ended allocations."""
        now = self.clock.now()
        oldest = await self.store.compact(
            max_events=self.settings.retention_max_events,
            min_time=now - self.settings.retention_max_age_seconds,
        )
        self.hub.compacted(oldest)
        horizon = now - self.settings.allocation_retention_seconds
        for a in list(self.state.allocations.values()):
            if a.state.terminal and a.id not in self.state.live and (a.end_time or now) < horizon:
                self.state.forget(a)
                self._deletes.append((EventKind.ALLOCATION, a.id))
        await self._flush()

    # -- allocations -------------------------------------------------------

    def get_allocation(self, allocation_id: str) -> Allocation:
        a = self.state.allocations.get(allocation_id)
        if a is None:
            raise NotFound("allocation", allocation_id)
        return a

    def list_allocations(
        self, tenant: str, node_id: str, states: frozenset[AllocationState]
    ) -> list[Allocation]:
        out = []
        for a in self.state.allocations.values():
            if tenant and a.tenant != tenant and not a.tenant.startswith(tenant + "/"):
                continue
            if states and a.state not in states:
                continue
            if node_id and not any(p.node_id == node_id for p in a.placements):
                continue
            out.append(a)
        out.sort(key=lambda a: a.seq)
        return out

    async def allocate(self, request: Allocation, dry_run: bool) -> tuple[Allocation, list[str]]:
        """Creates a PENDING allocation, lets the scheduler consider it, returns it as it stands.

        `request` carries the validated fields; the engine fills id, times and state.
        A repeated (tenant, request_id) answers with the first allocation.
        """
        if request.request_id:
            existing_id = self.state.by_request.get((request.tenant, request.request_id))
            if existing_id is not None:
                existing = self.state.allocations[existing_id]
                await self.wait_committed(existing.revision)
                return existing, []
        if request.reservation_id:
            raise NotFound("reservation", request.reservation_id)
        request.lease_seconds = request.lease_seconds or self.settings.default_lease_seconds
        snap = self.snapshot()
        reason = fairshare.check_admissible(snap, request)
        if reason is not None:
            raise QuotaExceeded([QuotaViolation(f"tenant:{request.tenant}", reason)])
        if dry_run:
            return self._dry_run(snap, request)
        a = replace(
            request,
            id="a-" + secrets.token_hex(8),
            state=AllocationState.PENDING,
            create_time=snap.now,
            placements=(),
            # What readers see until the cycle below has considered it.
            pending_reason="queued: the scheduler has not considered it yet",
            queue_position=0,
        )
        self.state.add(a, snap.now)
        self._emit_allocation(a, AllocationEventType.CREATED)
        # The cycle's commit carries the creation too: one transaction, and the answer
        # (placed or pending with a reason) is durable when the cycle is done.
        await self.schedule_now()
        return a, []

    def _dry_run(self, snap: Snapshot, request: Allocation) -> tuple[Allocation, list[str]]:
        probe = replace(request, id="dry-run", create_time=snap.now, seq=self.revision + 1)
        result: DryRun = scheduler_cycle.dry_run(snap, probe)
        probe.id = ""
        probe.seq = 0
        if result.placements:
            probe.state = AllocationState.ALLOCATED
            probe.placements = result.placements
        else:
            probe.state = AllocationState.PENDING
            probe.pending_reason = result.reason
            probe.queue_position = result.position
        return probe, list(result.preempted_ids)

    async def release(self, allocation_id: str) -> Allocation:
        a = self.get_allocation(allocation_id)
        if a.state == AllocationState.PENDING:
            self._end(a, AllocationState.CANCELLED, "cancelled by its owner")
        elif a.state == AllocationState.ALLOCATED:
            self._end(a, AllocationState.RELEASED, "released by its owner")
        else:
            # Already ended: releasing again is a no-op that answers the same.
            await self.wait_committed(a.revision)
            return a
        self.request_cycle()
        await self._flush()
        return a

    async def renew(self, allocation_id: str, lease_seconds: int) -> Allocation:
        a = self.get_allocation(allocation_id)
        if a.state.terminal:
            raise FailedPrecondition(
                "ALLOCATION_ENDED",
                f"allocation:{a.id}",
                f"allocation {a.id} is {a.state.name} and can no longer be renewed",
            )
        if lease_seconds:
            a.lease_seconds = lease_seconds
        if a.state == AllocationState.ALLOCATED:
            a.lease_expire_time = self.clock.now() + a.lease_seconds
            self._arm(a.lease_expire_time, "lease", a.id)
        self._emit_allocation(a, AllocationEventType.UPDATED)
        await self._flush()
        return a

    # -- nodes -------------------------------------------------------------

    def get_node(self, node_id: str) -> Node:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise NotFound("node", node_id)
        return node

    async def register_node(self, node: Node) -> Node:
        now = self.clock.now()
        node.last_heartbeat_time = now
        node.lease_expire_time = now + self.settings.node_lease_seconds
        existing = self.state.nodes.get(node.id)
        if existing is not None:
            # Re-registering keeps what operators asked for (a cordon, a drain).
            node.admin_state = existing.admin_state
            node.state = existing.admin_state
            if existing.state == existing.admin_state:
                node.state_reason = existing.state_reason
            else:
                node.state_reason = _returned(existing.admin_state)
            present = {g.index for g in node.gpus}
            for a in self.state.on_node(node.id):
                gone = [
                    i
                    for p in a.placements
                    if p.node_id == node.id
                    for i in p.gpu_indices
                    if i not in present
                ]
                if gone and a.state == AllocationState.ALLOCATED:
                    self._end(
                        a,
                        AllocationState.LOST,
                        f"GPU {gone[0]} is no longer reported by node {node.id}",
                    )
        self.state.nodes[node.id] = node
        self._emit_node(node)
        self._arm_node(node)
        self.request_cycle()
        await self._flush()
        return node

    async def heartbeat(self, node_id: str, reports: Sequence[GpuReport]) -> Node:
        node = self.get_node(node_id)
        now = self.clock.now()
        node.last_heartbeat_time = now
        node.lease_expire_time = now + self.settings.node_lease_seconds
        changed = False
        if node.state == NodeState.DOWN:
            node.state, node.state_reason = node.admin_state, _returned(node.admin_state)
            changed = True
        by_index = {g.index: g for g in node.gpus}
        for report in reports:
            gpu = by_index.get(report.index)
            if gpu is None:
                continue
            if report.metrics is not None:
                gpu.metrics = report.metrics
            if report.health is not None and report.health != gpu.health:
                gpu.health = report.health
                changed = True
        self._arm_node(node)
        if changed:
            self._emit_node(node)
            self.request_cycle()
            await self._flush()
        return node

    def _set_admin(self, node: Node, admin: NodeState, reason: str) -> None:
        """Records an operator's cordon, drain or uncordon; a DOWN node shows it when back."""
        node.admin_state = admin
        if node.state != NodeState.DOWN:
            node.state, node.state_reason = admin, reason
        self._emit_node(node)

    async def cordon(self, node_id: str, reason: str) -> Node:
        node = self.get_node(node_id)
        # Cordoning a draining node would stop nothing new and forget the drain.
        if node.admin_state == NodeState.READY:
            self._set_admin(node, NodeState.CORDONED, reason or "cordoned")
            await self._flush()
        return node

    async def uncordon(self, node_id: str) -> Node:
        node = self.get_node(node_id)
        if node.admin_state != NodeState.READY:
            self._set_admin(node, NodeState.READY, "")
            self.request_cycle()
            await self._flush()
        return node

    async def drain(
        self, node_id: str, reason: str, grace_seconds: float
    ) -> tuple[Node, list[str]]:
        node = self.get_node(node_id)
        self._set_admin(node, NodeState.DRAINING, reason or "draining")
        now = self.clock.now()
        grace = grace_seconds or self.config.preemption_grace_seconds
        evicted = []
        for a in self.state.on_node(node_id):
            if a.state == AllocationState.ALLOCATED:
                self._preempt(a, now, grace, f"node {node_id} is draining")
                evicted.append(a.id)
        self.request_cycle()
        await self._flush()
        return node, evicted

    # -- quotas ------------------------------------------------------------

    def get_quota(self, tenant: str) -> Quota:
        quota = self.state.quotas.get(tenant)
        if quota is None:
            raise NotFound("quota", tenant, f"tenant {tenant!r} has no quota of its own")
        return quota

    async def set_quota(self, quota: Quota) -> Quota:
        quota.update_time = self.clock.now()
        self.state.quotas[quota.tenant] = quota
        self._emit_quota(quota)
        self.request_cycle()
        await self._flush()
        return quota

    async def delete_quota(self, tenant: str) -> None:
        quota = self.get_quota(tenant)
        del self.state.quotas[tenant]
        self._emit_quota(quota, deleted=True)
        self.request_cycle()
        await self._flush()

    def usage(self, tenant: str) -> fairshare.TenantUsage:
        return fairshare.tenant_usage(self.snapshot(), tenant)


def _release(
    waiters: list[tuple[int, asyncio.Future[None]]],
    reached: int,
    error: BaseException | None = None,
) -> list[tuple[int, asyncio.Future[None]]]:
    """Wakes the waiters whose mark is reached (all of them, with `error`, on failure)."""
    keep = []
    for wanted, fut in waiters:
        if wanted <= reached or error is not None:
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(Unavailable(f"the store failed: {error}"))
        else:
            keep.append((wanted, fut))
    return keep


def _returned(admin: NodeState) -> str:
    if admin == NodeState.READY:
        return "agent is back"
    return f"agent is back; still {admin.name.lower()} by an operator"
