"""The scheduler core decides the same whatever order its snapshot's mappings iterate in.

A worker process once fed the core a snapshot whose allocations iterated in another
order than creation order, and a tenant ended above its limit (`org holds 12 > limit
10`). The snapshot's `allocations`, `nodes` and `quotas` are mappings: nothing promises
their order, so the decisions must not depend on it, and whatever the order, applying
them must keep every promise a client can check.

Each example: random nodes (GPU models, sizes), a tenant tree with guarantees, limits and
weights (siblings `org/a` and `org/ab`, whose names share a prefix), running work
(priorities, gangs over two nodes), PREEMPTED allocations still in their grace whose
preemptor is pending, some whose grace is over, and pending work; grace 0 and > 0. The
cycle runs on the snapshot and on copies whose mappings iterate in shuffled orders; the
decisions must be identical, and after applying them (`apply.apply_plan`, as the engine
does) no tenant or ancestor holds more than its limit counting everything that holds
capacity (preempted allocations in their grace included), no GPU is held twice, and
every placed gang is whole.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmgrpc.model import (
    Allocation,
    AllocationState,
    BorrowingPreemption,
    Node,
    NodeState,
    Placement,
    Quota,
    ReclaimPolicy,
    Resources,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.apply import apply_plan
from rmgrpc.scheduler.cycle import run_cycle
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.scheduler.snapshot import Decisions, SchedulerConfig, Snapshot
from rmgrpc.state import ClusterState, in_subtree

NOW = 1_000_000.0
TENANTS = ("org/a", "org/ab", "org", "x", "x/y")
PARENTS = ("org", "x")
MODELS = ("H100", "A100")
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Case:
    nodes: dict[str, Node]
    quotas: dict[str, Quota]
    allocations: dict[str, Allocation]
    config: SchedulerConfig
    ended: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            now=NOW,
            nodes=self.nodes,
            allocations=self.allocations,
            quotas=self.quotas,
            config=self.config,
            ended_usage=self.ended,
        )


def _used(allocs: Mapping[str, Allocation], tenant: str) -> tuple[int, int]:
    """GPUs and CPU millis that hold capacity in `tenant`'s subtree."""
    gpus = cpu = 0
    for a in allocs.values():
        if a.holds_capacity(NOW) and in_subtree(a.tenant, tenant):
            gpus += a.total_gpus
            cpu += a.count * a.shape.cpu_millis
    return gpus, cpu


def _over(quotas: Mapping[str, Quota], allocs: Mapping[str, Allocation]) -> list[str]:
    """Every tenant (or ancestor) holding more than its limit, in words."""
    out = []
    for t, q in sorted(quotas.items()):
        gpus, cpu = _used(allocs, t)
        if q.limit.gpus is not None and gpus > q.limit.gpus:
            out.append(f"{t} holds {gpus} GPUs > limit {q.limit.gpus}")
        if q.limit.cpu_millis is not None and cpu > q.limit.cpu_millis:
            out.append(f"{t} holds {cpu}m CPU > limit {q.limit.cpu_millis}")
    return out


def _fits_limits(case: tuple[dict[str, Quota], dict[str, Allocation]], a: Allocation) -> bool:
    quotas, allocs = case
    trial = {**allocs, a.id: dataclasses.replace(a, state=AllocationState.ALLOCATED)}
    return not _over(quotas, trial)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    sizes = draw(st.lists(st.integers(1, 8), min_size=2, max_size=5))
    nodes: dict[str, Node] = {}
    for i, g in enumerate(sizes):
        state = draw(st.sampled_from([NodeState.READY] * 5 + [NodeState.CORDONED]))
        nodes[f"n{i}"] = make_node(
            f"n{i}",
            g,
            draw(st.sampled_from(MODELS)),
            cpu_millis=draw(st.sampled_from([4000, 64_000])),
            state=state,
        )
    quotas: dict[str, Quota] = {}
    for t in TENANTS:
        if not draw(st.integers(0, 3)):
            continue
        limit = draw(st.one_of(st.none(), st.integers(0, 12)))
        guar = draw(st.integers(0, 4))
        if limit is not None:
            guar = min(guar, limit)
        quotas[t] = Quota(
            t,
            guaranteed=Resources(gpus=guar, cpu_millis=draw(st.sampled_from([None, 2000]))),
            limit=Resources(
                gpus=limit,
                cpu_millis=draw(st.sampled_from([None, None, 6000])),
                gpus_by_model=draw(st.sampled_from([{}, {}, {"H100": 3}])),
            ),
            weight=draw(st.sampled_from([0.0, 1.0, 1.0, 2.0, 3.0])),
            within_tenant_preemption=draw(st.sampled_from(list(WithinTenantPreemption))),
            reclaim_from_others=draw(st.sampled_from(list(ReclaimPolicy))),
            preemption_while_borrowing=draw(st.sampled_from(list(BorrowingPreemption))),
            lending_limit=Resources(gpus=draw(st.sampled_from([None, None, 1]))),
        )
    free = {nid: [g.index for g in n.gpus] for nid, n in nodes.items()}
    cpu_free = {nid: n.cpu_millis for nid, n in nodes.items()}
    allocs: dict[str, Allocation] = {}
    seq = 0

    def new(tenant: str, gpus: int, count: int, **kw: object) -> Allocation:
        nonlocal seq
        seq += 1
        # Ids in another order than arrival (as the server's random ids are), and equal
        # create times: arrival is the sequence number.
        age = draw(st.sampled_from([5.0, 100.0, 5000.0]))
        return Allocation(
            id=draw(st.sampled_from(["a", "b", "z"])) + f"{seq:02d}",
            tenant=tenant,
            count=count,
            shape=Shape(
                gpus=gpus, cpu_millis=draw(st.sampled_from([1000, 3000])), memory_bytes=1024**3
            ),
            priority=draw(st.integers(-1, 2)),
            create_time=NOW - age,
            seq=draw(st.sampled_from([seq, seq, (seq + 1) // 2 * 2])),
            **kw,  # type: ignore[arg-type]
        )

    def place(a: Allocation) -> bool:
        """Places `a` on free GPUs (a gang over distinct nodes), if that keeps limits."""
        s = a.shape
        where = [
            nid
            for nid in sorted(free)
            if len(free[nid]) >= s.gpus and cpu_free[nid] >= s.cpu_millis
        ][: a.count]
        if len(where) < a.count or not _fits_limits(case_limits, a):
            return False
        a.placements = tuple(Placement(n, tuple(free[n][: s.gpus])) for n in where)
        for n in where:
            del free[n][: s.gpus]
            cpu_free[n] -= s.cpu_millis
        a.allocate_time = a.create_time + 1
        return True

    case_limits = (quotas, allocs)
    # Running work (some of it later preempted, in or past its grace).
    for _ in range(draw(st.integers(0, 9))):
        a = new(
            draw(st.sampled_from(TENANTS)),
            draw(st.integers(1, 4)),
            draw(st.sampled_from([1, 1, 1, 2])),
            state=AllocationState.ALLOCATED,
        )
        if place(a):
            allocs[a.id] = a
    # Pending work.
    pending: list[Allocation] = []
    for _ in range(draw(st.integers(1, 8))):
        model = draw(st.sampled_from(["", "", "", *MODELS]))
        a = new(
            draw(st.sampled_from(TENANTS)),
            draw(st.integers(1, 4)),
            draw(st.sampled_from([1, 1, 2, 3])),
        )
        a.shape = dataclasses.replace(a.shape, gpu_model=model)
        allocs[a.id] = a
        pending.append(a)
    # Some running work preempted earlier for a pending request: in its grace (it
    # still holds its GPUs), or past it (it holds nothing, yet the snapshot may show it).
    running = sorted(
        (a for a in allocs.values() if a.state == AllocationState.ALLOCATED), key=lambda a: a.seq
    )
    for a in running:
        if not draw(st.integers(0, 2)):
            a.state = AllocationState.PREEMPTED
            a.preempted_by = draw(st.sampled_from(pending)).id
            a.end_time = NOW - 1
            a.grace_end_time = NOW + draw(st.sampled_from([-1.0, 10.0, 10.0]))
            a.state_reason = draw(
                st.sampled_from(["preempted", "preempted (t reclaims its guaranteed quota)"])
            )
    half_life = draw(st.sampled_from([0.0, 600.0]))
    ended = {}
    if half_life:
        ended = draw(st.dictionaries(st.sampled_from(TENANTS), st.just((2.0, 500.0, 0.0))))
    config = SchedulerConfig(
        min_runtime_seconds=draw(st.sampled_from([0.0, 60.0])),
        preemption_grace_seconds=draw(st.sampled_from([0.0, 30.0])),
        max_preemptions_per_cycle=draw(st.sampled_from([1, 8])),
        starvation_seconds=draw(st.sampled_from([0.0, 120.0])),
        fair_share_half_life_seconds=half_life,
    )
    return Case(nodes, quotas, allocs, config, ended)


def _reordered(case: Case, order: list[int], node_order: list[int], quota_order: list[int]) -> Case:
    """The same case, its mappings iterating in the given orders (fresh copies)."""
    ids = list(case.allocations)
    nids = list(case.nodes)
    tenants = list(case.quotas)
    allocs = copy.deepcopy(case.allocations)
    return Case(
        {nids[i]: case.nodes[nids[i]] for i in node_order},
        {tenants[i]: case.quotas[tenants[i]] for i in quota_order},
        {ids[i]: allocs[ids[i]] for i in order},
        case.config,
        case.ended,
    )


def _as_comparable(d: Decisions) -> tuple[object, ...]:
    return (
        d.admissions,
        d.preemptions,
        list(d.pending.items()),
        list(d.held_nodes.items()),
        d.reserved,
    )


def _check_applied(case: Case, d: Decisions) -> None:
    """Apply `d` as the engine does, then check what a client could see."""
    allocs = copy.deepcopy(case.allocations)
    state = ClusterState.of(case.nodes, case.quotas, allocs.values(), NOW)
    apply_plan(state, d, NOW, case.config)
    holding = {aid: a for aid, a in allocs.items() if a.holds_capacity(NOW)}
    assert not _over(case.quotas, holding)
    gpus: Counter[tuple[str, int]] = Counter()
    for a in holding.values():
        for p in a.placements:
            for i in p.gpu_indices:
                gpus[(p.node_id, i)] += 1
        if a.state == AllocationState.ALLOCATED:
            assert len(a.placements) == a.count, f"gang {a.id} not whole"
            for p in a.placements:
                assert len(p.gpu_indices) == a.shape.gpus
                node = case.nodes[p.node_id]
                models = {g.index: g.model for g in node.gpus}
                if a.shape.gpu_model:
                    assert {models[i] for i in p.gpu_indices} == {a.shape.gpu_model}
    twice = [k for k, n in gpus.items() if n > 1]
    assert not twice, f"GPUs held twice: {twice}"


@SETTINGS
@given(cases(), st.data())
def test_decisions_do_not_depend_on_the_snapshot_order(case: Case, data: st.DataObject) -> None:
    base = run_cycle(case.snapshot())
    _check_applied(case, base)
    for _ in range(2):
        order = data.draw(st.permutations(range(len(case.allocations))))
        node_order = data.draw(st.permutations(range(len(case.nodes))))
        quota_order = data.draw(st.permutations(range(len(case.quotas))))
        other = _reordered(case, order, node_order, quota_order)
        got = run_cycle(other.snapshot())
        assert _as_comparable(got) == _as_comparable(base)
        _check_applied(other, got)
