"""A pure, in-memory replay of scheduling decisions over time.

The engine applies `Decisions` through `apply.apply_plan`; this does the same to plain dicts, so
tests and the benchmark can run many cycles and watch a cluster converge without a
server. It owns its objects (it copies what it is given) and never touches a clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from rmgrpc.model import (
    Allocation,
    AllocationState,
    Gpu,
    Node,
    NodeState,
    Quota,
    Shape,
)
from rmgrpc.scheduler.apply import apply_plan
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.snapshot import Decisions, SchedulerConfig, Snapshot
from rmgrpc.state import ClusterState, in_subtree

GIB = 1024**3


def make_node(
    node_id: str,
    gpus: int = 8,
    model: str = "H100",
    *,
    cpu_millis: int = 64_000,
    memory_bytes: int = 512 * GIB,
    labels: Mapping[str, str] | None = None,
    state: NodeState = NodeState.READY,
) -> Node:
    return Node(
        id=node_id,
        cpu_millis=cpu_millis,
        memory_bytes=memory_bytes,
        labels=dict(labels or {}),
        gpus=[
            Gpu(index=i, uuid=f"{node_id}-gpu{i}", model=model, memory_bytes=80 * GIB)
            for i in range(gpus)
        ],
        state=state,
    )


def apply_decisions(
    allocations: dict[str, Allocation],
    decisions: Decisions,
    now: float,
    config: SchedulerConfig,
    nodes: Mapping[str, Node],
) -> None:
    """What the engine does with a pass's decisions (`apply.apply_plan`, the same code),
    on a dict of allocations it owns; pending ones take the pass's reason and position."""
    state = ClusterState.of(nodes, {}, allocations.values(), now)
    applied = apply_plan(state, decisions, now, config)
    for aid, status in applied.statuses.items():
        a = allocations[aid]
        a.pending_reason = status.reason
        a.queue_position = status.position


class Simulator:
    """A cluster, its quotas and allocations, and a clock that only moves when told."""

    def __init__(
        self,
        nodes: Iterable[Node],
        quotas: Iterable[Quota] = (),
        config: SchedulerConfig | None = None,
        now: float = 1_000_000.0,
    ) -> None:
        self.nodes: dict[str, Node] = {n.id: n for n in nodes}
        self.quotas: dict[str, Quota] = {q.tenant: q for q in quotas}
        self.config = config or SchedulerConfig()
        self.now = now
        self.allocations: dict[str, Allocation] = {}
        self.ended: dict[str, Allocation] = {}
        self._seq = 0
        self.history: list[Decisions] = []

    def submit(
        self,
        tenant: str,
        shape: Shape,
        count: int = 1,
        *,
        priority: int = 0,
        duration: int = 0,
        alloc_id: str | None = None,
    ) -> Allocation:
        self._seq += 1
        a = Allocation(
            id=alloc_id or f"a{self._seq:05d}",
            tenant=tenant,
            count=count,
            shape=shape,
            priority=priority,
            max_duration_seconds=duration,
            create_time=self.now,
            seq=self._seq,
        )
        self.allocations[a.id] = a
        return a

    def add(self, alloc: Allocation) -> Allocation:
        """Add a ready-made allocation (e.g. already placed); its seq is kept if set."""
        if alloc.seq <= 0:
            self._seq += 1
            alloc.seq = self._seq
        else:
            self._seq = max(self._seq, alloc.seq)
        self.allocations[alloc.id] = alloc
        return alloc

    def snapshot(self) -> Snapshot:
        return Snapshot(
            now=self.now,
            nodes=self.nodes,
            allocations=dict(self.allocations),
            quotas=self.quotas,
            config=self.config,
        )

    def step(self) -> Decisions:
        """Run one cycle at the current time and apply it."""
        d = run_cycle(self.snapshot())
        apply_decisions(self.allocations, d, self.now, self.config, self.nodes)
        self.history.append(d)
        self._expire()
        return d

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._expire()

    def finish(self, alloc_id: str) -> None:
        """The work ended on its own (released)."""
        a = self.allocations.pop(alloc_id)
        a.state = AllocationState.RELEASED
        a.end_time = self.now
        self.ended[a.id] = a

    def _expire(self) -> None:
        for aid in sorted(self.allocations):
            a = self.allocations[aid]
            if a.state == AllocationState.PREEMPTED and not a.holds_capacity(self.now):
                a.end_time = self.now
                self.ended[aid] = self.allocations.pop(aid)
            elif (
                a.state == AllocationState.ALLOCATED
                and a.max_end_time is not None
                and self.now >= a.max_end_time
            ):
                a.state = AllocationState.EXPIRED
                a.end_time = self.now
                self.ended[aid] = self.allocations.pop(aid)

    # -- views for assertions ----------------------------------------------------------

    def live(self) -> list[Allocation]:
        return [a for a in self.allocations.values() if a.holds_capacity(self.now)]

    def pending(self) -> list[Allocation]:
        return [a for a in self.allocations.values() if a.state == AllocationState.PENDING]

    def held_gpus(self, tenant: str) -> int:
        """GPUs held by the tenant's subtree (allocated, or preempted within grace)."""
        return sum(a.total_gpus for a in self.live() if in_subtree(a.tenant, tenant))

    def running_gpus(self, tenant: str) -> int:
        """GPUs of the tenant's ALLOCATED (not preempted) allocations."""
        return sum(
            a.total_gpus
            for a in self.allocations.values()
            if a.state == AllocationState.ALLOCATED and in_subtree(a.tenant, tenant)
        )

    def get(self, alloc_id: str) -> Allocation:
        """An allocation, live or ended."""
        a = self.allocations.get(alloc_id)
        return a if a is not None else self.ended[alloc_id]

    def copy_allocation(self, alloc_id: str) -> Allocation:
        return dataclasses.replace(self.allocations[alloc_id])
