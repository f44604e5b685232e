"""The cluster view behind GetClusterSummary and the gauges, over random clusters.

Whatever the cluster, the view must add up: nodes by state cover every node; GPUs per
model add up to the capacity and to what is allocated; the top-level tenants together
hold and ask for exactly what the cluster says is allocated and pending; each tenant's
oldest wait is the oldest pending allocation of its subtree; and the tenant figures are
GetUsage's, from the same ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmgrpc.model import (
    Allocation,
    AllocationState,
    GpuHealth,
    GpuMetrics,
    Node,
    NodeState,
    Placement,
    Quota,
    Resources,
    Shape,
)
from rmgrpc.scheduler import fairshare
from rmgrpc.scheduler.simulate import GIB, make_node
from rmgrpc.scheduler.snapshot import Snapshot
from rmgrpc.state import in_subtree
from rmgrpc.summary import ClusterView

NOW = 1_800_000_000.0
TENANTS = ("a", "b", "org/x", "org/y", "org/x/deep")


@dataclass
class Cluster:
    nodes: dict[str, Node]
    allocations: dict[str, Allocation]
    quotas: dict[str, Quota]

    def snapshot(self) -> Snapshot:
        return Snapshot(now=NOW, nodes=self.nodes, allocations=self.allocations, quotas=self.quotas)


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    nodes: dict[str, Node] = {}
    for i in range(draw(st.integers(0, 4))):
        node = make_node(
            f"n{i}",
            draw(st.integers(0, 8)),
            draw(st.sampled_from(("H100", "A100"))),
            state=draw(st.sampled_from(list(NodeState))),
        )
        for g in node.gpus:
            if draw(st.booleans()):
                g.health = draw(st.sampled_from(list(GpuHealth)))
        nodes[node.id] = node
    free = {(n.id, g.index) for n in nodes.values() for g in n.gpus}
    allocations: dict[str, Allocation] = {}
    for i in range(draw(st.integers(0, 12))):
        tenant = draw(st.sampled_from(TENANTS))
        gpus = draw(st.integers(0, 3))
        a = Allocation(
            id=f"a{i}",
            tenant=tenant,
            count=draw(st.integers(1, 2)),
            shape=Shape(gpus, draw(st.sampled_from(("", "H100"))), 100, GIB),
            create_time=NOW - draw(st.integers(0, 10_000)),
            seq=i,
        )
        # Place it when some node has room for every replica, else it waits.
        placements = []
        taken: set[tuple[str, int]] = set()
        for _ in range(a.count):
            for node in nodes.values():
                idle = sorted(i for n, i in free - taken if n == node.id)
                if len(idle) >= gpus:
                    taken |= {(node.id, i) for i in idle[:gpus]}
                    placements.append(Placement(node.id, tuple(idle[:gpus])))
                    break
        if len(placements) == a.count and draw(st.booleans()):
            free -= taken
            a.placements = tuple(placements)
            a.state = AllocationState.ALLOCATED
            a.allocate_time = NOW
        allocations[a.id] = a
    quotas = {
        t: Quota(tenant=t, guaranteed=Resources(gpus=draw(st.integers(0, 4))))
        for t in draw(st.sets(st.sampled_from(TENANTS)))
    }
    return Cluster(nodes, allocations, quotas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_the_view_adds_up(cluster: Cluster) -> None:
    view = ClusterView.of(cluster.snapshot(), revision=7)
    nodes = cluster.nodes.values()
    allocs = cluster.allocations.values()
    assert view.revision == 7
    assert sum(view.nodes_by_state.values()) == len(cluster.nodes)
    assert set(view.nodes_by_state) == set(NodeState)  # zeros included
    assert view.capacity.gpus == sum(len(n.gpus) for n in nodes)
    assert view.capacity.gpus == sum(m.total for m in view.models.values())
    assert view.schedulable.gpus == sum(
        g.health == GpuHealth.HEALTHY for n in nodes if n.state == NodeState.READY for g in n.gpus
    )
    placed = [a for a in allocs if a.state == AllocationState.ALLOCATED]
    waiting = [a for a in allocs if a.state == AllocationState.PENDING]
    held_gpus = sum(len(p.gpu_indices) for a in placed for p in a.placements)
    assert view.allocated.gpus == held_gpus == sum(m.allocated for m in view.models.values())
    assert view.allocated.cpu_millis == sum(a.count * a.shape.cpu_millis for a in placed)
    assert view.pending.gpus == sum(a.total_gpus for a in waiting)
    assert (view.running, view.pending_count) == (len(placed), len(waiting))
    for m in view.models.values():
        assert 0 <= m.allocated <= m.total or m.total == 0
        assert m.healthy + m.unhealthy == m.total
    # The top-level tenants together are the whole cluster, counted once.
    roots = [t for t in view.tenants.values() if not t.parent]
    assert sum(t.usage.held.gpus or 0 for t in roots) == held_gpus
    assert sum(t.usage.pending.gpus or 0 for t in roots) == view.pending.gpus
    ledger = fairshare.Ledger(cluster.snapshot())
    for name, t in view.tenants.items():
        subtree = [a.create_time for a in waiting if in_subtree(a.tenant, name)]
        assert t.oldest_pending_create_time == (min(subtree) if subtree else None), name
        assert t.usage == fairshare.usage_from(ledger, name), name
    assert set(view.tenants) >= {a.tenant for a in allocs} | set(cluster.quotas)


def test_gpu_metrics_are_added_per_model_and_not_shared_between_copies() -> None:
    node = make_node("n0", 2, "H100")
    node.gpus[0].metrics = GpuMetrics(utilization_percent=80, memory_used_bytes=GIB)
    node.gpus[1].metrics = GpuMetrics(utilization_percent=20, memory_used_bytes=GIB)
    snap = Snapshot(now=NOW, nodes={"n0": node}, allocations={}, quotas={})
    view = ClusterView.of(snap, revision=1)
    view.add_gpu_metrics({"n0": node})
    h100 = view.models["H100"]
    assert (h100.reporting, h100.mean_utilization_percent) == (2, 50.0)
    assert h100.memory_used_bytes == 2 * GIB
    assert view.mean_gpu_utilization_percent == 50.0
    assert view.utilization() == (0.0, 0.0, 0.0)
