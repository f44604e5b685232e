"""The cluster at a glance, computed one way for every reader: GetClusterSummary,
StreamClusterMetrics and the Prometheus gauges.

`ClusterView.of` is pure (a scheduling snapshot in, plain numbers out), so it runs in a
worker thread and what it reports is exactly what the snapshot's revision holds. Tenant
figures come from the fair-share ledger the scheduler and GetUsage use, never a second
copy of that arithmetic. Measured GPU metrics (utilization, memory used) are status, not
part of a revision: `add_gpu_metrics` adds them from the live nodes on the event loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rmgrpc.model import (
    AllocationState,
    GpuHealth,
    Node,
    NodeState,
    Reservation,
    ReservationState,
    Resources,
)
from rmgrpc.scheduler import fairshare
from rmgrpc.scheduler.snapshot import Snapshot

if TYPE_CHECKING:
    from rmgrpc.engine import Engine


@dataclass(slots=True)
class ModelView:
    """The GPUs of one model across every node."""

    model: str
    total: int = 0
    allocated: int = 0
    unhealthy: int = 0
    # GPUs pending requests ask for by this model name.
    pending: int = 0
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    utilization_sum: float = 0.0
    reporting: int = 0

    @property
    def healthy(self) -> int:
        return self.total - self.unhealthy

    @property
    def allocated_fraction(self) -> float:
        return self.allocated / self.total if self.total else 0.0

    @property
    def mean_utilization_percent(self) -> float:
        return self.utilization_sum / self.reporting if self.reporting else 0.0


def _zero() -> Resources:
    return Resources(gpus=0, cpu_millis=0, memory_bytes=0)


@dataclass(slots=True)
class ReservedView:
    """Capacity booked by live reservations: ACTIVE ones (window begun) and SCHEDULED
    ones (window to come), count x shape each."""

    active: Resources = field(default_factory=_zero)
    upcoming: Resources = field(default_factory=_zero)

    def add(self, r: Reservation) -> None:
        if r.state == ReservationState.ACTIVE:
            into = self.active
        elif r.state == ReservationState.SCHEDULED:
            into = self.upcoming
        else:
            return  # ended or cancelled: holds nothing
        s, n = r.shape, r.count
        _add(into, n * s.gpus, n * s.cpu_millis, n * s.memory_bytes)


def reserved_of(reservations: Iterable[Reservation], tenant: str = "") -> ReservedView:
    """What the live reservations of `tenant`'s subtree (by name, as reservations are
    authorized; all when empty) book."""
    out = ReservedView()
    for r in reservations:
        if not tenant or r.tenant == tenant or r.tenant.startswith(tenant + "/"):
            out.add(r)
    return out


@dataclass(slots=True)
class TenantView:
    """One tenant with its subtree, as GetUsage counts it, and its oldest wait."""

    usage: fairshare.TenantUsage
    parent: str
    oldest_pending_create_time: float | None = None
    reserved: ReservedView = field(default_factory=ReservedView)


@dataclass(slots=True)
class ClusterView:
    revision: int
    read_time: float
    nodes_by_state: dict[NodeState, int] = field(default_factory=dict)
    # Every registered node; READY nodes' healthy GPUs; held by live allocations; asked
    # for by pending ones.
    capacity: Resources = field(default_factory=_zero)
    schedulable: Resources = field(default_factory=_zero)
    allocated: Resources = field(default_factory=_zero)
    pending: Resources = field(default_factory=_zero)
    models: dict[str, ModelView] = field(default_factory=dict)
    running: int = 0
    # PREEMPTED allocations still holding capacity in their grace period.
    leaving: int = 0
    pending_count: int = 0
    tenants: dict[str, TenantView] = field(default_factory=dict)
    reserved: ReservedView = field(default_factory=ReservedView)

    @staticmethod
    def of(snapshot: Snapshot, revision: int) -> ClusterView:
        """The view of `snapshot`, taken at `revision`. Pure: safe in a worker thread."""
        view = ClusterView(revision=revision, read_time=snapshot.now)
        view.nodes_by_state = dict.fromkeys(NodeState, 0)
        for node in snapshot.nodes.values():
            view.nodes_by_state[node.state] = view.nodes_by_state.get(node.state, 0) + 1
            _add(view.capacity, len(node.gpus), node.cpu_millis, node.memory_bytes)
            if node.schedulable:
                healthy = sum(g.health == GpuHealth.HEALTHY for g in node.gpus)
                _add(view.schedulable, healthy, node.cpu_millis, node.memory_bytes)
            for g in node.gpus:
                m = view.model(g.model)
                m.total += 1
                m.memory_total_bytes += g.memory_bytes
                m.unhealthy += g.health == GpuHealth.UNHEALTHY
        oldest: dict[str, float] = {}
        now = snapshot.now
        for a in snapshot.allocations.values():
            if a.holds_capacity(now):
                view.running += a.state == AllocationState.ALLOCATED
                view.leaving += a.state == AllocationState.PREEMPTED
                for p in a.placements:
                    _add(
                        view.allocated, len(p.gpu_indices), a.shape.cpu_millis, a.shape.memory_bytes
                    )
                    on = snapshot.nodes.get(p.node_id)
                    models = {g.index: g.model for g in on.gpus} if on else {}
                    for i in p.gpu_indices:
                        view.model(models.get(i, a.shape.gpu_model)).allocated += 1
            elif a.state == AllocationState.PENDING:
                view.pending_count += 1
                s, n = a.shape, a.count
                _add(view.pending, n * s.gpus, n * s.cpu_millis, n * s.memory_bytes)
                if s.gpu_model and s.gpus:
                    view.model(s.gpu_model).pending += n * s.gpus
                if a.tenant not in oldest or a.create_time < oldest[a.tenant]:
                    oldest[a.tenant] = a.create_time
        ledger = fairshare.Ledger(snapshot)
        tree = ledger.tree
        subtree_oldest: dict[str, float] = {}
        for tenant, created in oldest.items():
            for t in tree.chain(tenant):
                if t not in subtree_oldest or created < subtree_oldest[t]:
                    subtree_oldest[t] = created
        reservations = list(snapshot.reservations.values())
        view.reserved = reserved_of(reservations)
        for t in sorted(tree.parent):
            view.tenants[t] = TenantView(
                usage=fairshare.usage_from(ledger, t),
                parent=tree.parent[t],
                oldest_pending_create_time=subtree_oldest.get(t),
                reserved=reserved_of(reservations, t),
            )
        # A model that lost its last GPU but is still asked for stays visible (pending).
        view.models = dict(sorted(view.models.items()))
        return view

    def model(self, name: str) -> ModelView:
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = ModelView(name)
        return m

    def add_gpu_metrics(self, nodes: Mapping[str, Node]) -> None:
        """Adds the latest measured GPU metrics (status, not revisioned) of `nodes`."""
        for node in nodes.values():
            for g in node.gpus:
                if g.metrics is None:
                    continue
                m = self.model(g.model)
                m.reporting += 1
                m.utilization_sum += g.metrics.utilization_percent
                m.memory_used_bytes += g.metrics.memory_used_bytes

    @property
    def mean_gpu_utilization_percent(self) -> float:
        reporting = sum(m.reporting for m in self.models.values())
        total = sum(m.utilization_sum for m in self.models.values())
        return total / reporting if reporting else 0.0

    def utilization(self) -> tuple[float, float, float]:
        """allocated / capacity for GPUs, CPU and memory (0 where there is none)."""
        out = []
        for name in ("gpus", "cpu_millis", "memory_bytes"):
            cap = getattr(self.capacity, name) or 0
            out.append((getattr(self.allocated, name) or 0) / cap if cap else 0.0)
        return out[0], out[1], out[2]


def _add(r: Resources, gpus: int, cpu_millis: int, memory_bytes: int) -> None:
    r.gpus = (r.gpus or 0) + gpus
    r.cpu_millis = (r.cpu_millis or 0) + cpu_millis
    r.memory_bytes = (r.memory_bytes or 0) + memory_bytes


# One view per engine and revision, shared by every summary reader (a dashboard's many
# streams, the metrics loop): built once in a worker thread, never on the event loop.
_cache: weakref.WeakKeyDictionary[Engine, tuple[int, asyncio.Future[ClusterView]]] = (
    weakref.WeakKeyDictionary()
)


async def current_view(engine: Engine, *, background: bool = False) -> ClusterView:
    """The cluster at the newest revision, once that revision is durable, with the latest
    GPU metrics added (a fresh copy per call: the metrics part is not cached).

    `background`: for readers that can wait (the metrics gauges), built where scheduling
    passes run (the pass worker's process by default) instead of in a thread of the
    server's, where it competes with the event loop for the GIL; it may wait for a pass
    in progress, and may be of a revision taken a little later."""
    revision = engine.revision
    cached = _cache.get(engine)
    if cached is None or cached[0] != revision:
        sched = engine.scheduling

        def take() -> tuple[Snapshot, int]:
            return sched.snapshot(), engine.revision

        if background:
            built = asyncio.ensure_future(sched.runner.view(engine.state, take))
        else:
            built = asyncio.ensure_future(asyncio.to_thread(ClusterView.of, *take()))
        cached = (revision, built)
        _cache[engine] = cached
        built.add_done_callback(lambda fut: _forget_failed(engine, fut))
    shared = await asyncio.shield(cached[1])
    view = _copy(shared)
    view.read_time = engine.clock.now()
    view.add_gpu_metrics(engine.state.nodes)
    await engine.wait_committed(view.revision)
    return view


def _forget_failed(engine: Engine, built: asyncio.Future[ClusterView]) -> None:
    """A failed build is not kept (the next reader tries again), and its error counts as
    seen even when every reader was cancelled first (a server stopping mid-build)."""
    if built.cancelled() or built.exception() is None:
        return
    cached = _cache.get(engine)
    if cached is not None and cached[1] is built:
        del _cache[engine]


def _copy(view: ClusterView) -> ClusterView:
    # Only the per-model measured fields change after the build: copy the models, share
    # the rest (never written after `of`).
    out = ClusterView(
        revision=view.revision,
        read_time=view.read_time,
        nodes_by_state=view.nodes_by_state,
        capacity=view.capacity,
        schedulable=view.schedulable,
        allocated=view.allocated,
        pending=view.pending,
        running=view.running,
        leaving=view.leaving,
        pending_count=view.pending_count,
        tenants=view.tenants,
        reserved=view.reserved,
    )
    out.models = {
        k: ModelView(m.model, m.total, m.allocated, m.unhealthy, m.pending, m.memory_total_bytes)
        for k, m in view.models.items()
    }
    return out
