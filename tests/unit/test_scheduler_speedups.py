"""The scheduler's shortcuts answer exactly what the plain computations they replace do.

Each shortcut (nodes grouped by kind for `never_fits_text`, victims judged once per
class in `_Search._allowed`, the written-out `has_free_gpus`) is compared with the plain
per-item computation on the bench's clusters at a small scale, including the cases that
make a shortcut step aside (taken victims, the requester's own tenant at equal priority).
`test_scheduler_decisions_digest` checks that whole cycles decide the same.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

import pytest

from rmgrpc.model import (
    Allocation,
    AllocationState,
    Quota,
    ReclaimPolicy,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.fairshare import Ledger
from rmgrpc.scheduler.placement import (
    STATIC_FILTERS,
    CapacityView,
    Explanation,
    NodeCapacity,
    ReplicaRequest,
    _models_for,
    has_free_gpus,
    never_fits_text,
    rejection,
    replicas_ever,
    shape_text,
)
from rmgrpc.scheduler.preemption import Mode, Policy, VictimPool, _Search
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot
from tests.bench.scheduler_bench import CASES, TENANTS, build_snapshot, random_shape


def small_snapshot(seed: int, nodes: int = 60) -> Snapshot:
    case = CASES["preemption"]
    config = SchedulerConfig(min_runtime_seconds=60, preemption_grace_seconds=30)
    return build_snapshot(
        nodes, 200, 300, seed, config, case.running_tenants, case.running_priorities
    )


def plain_never_fits(nodes: Iterable[NodeCapacity], shape: Shape, count: int) -> str | None:
    """`never_fits_text` node by node, as it was written before nodes were grouped."""
    req = ReplicaRequest(shape)
    ex = Explanation(shape, count)
    room = 0
    for n in nodes:
        ex.nodes += 1
        why = rejection(STATIC_FILTERS, n, req)
        if why is not None:
            ex.counters[why] = ex.counters.get(why, 0) + 1
            continue
        r = replicas_ever(n, shape)
        if r > 0:
            ex.fitting_nodes += 1
            ex.replica_room += r
        room += r
    if ex.nodes == 0 or room >= count:
        return None
    need = shape_text(shape)
    if ex.fitting_nodes:
        head = (
            f"never fits: the registered nodes could host only {ex.replica_room} of "
            f"{count} replicas of {need} even if empty"
        )
    else:
        head = f"never fits: no registered node could ever host one replica of {need}"
    return f"{head}; " + ex.counters_text()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_never_fits_by_kind_of_node_matches_node_by_node(seed: int) -> None:
    snap = small_snapshot(seed)
    view = CapacityView(snap.nodes, ())
    rng = random.Random(seed)
    shapes = [random_shape(rng) for _ in range(150)]
    # Shapes no node (or too few nodes) could ever host, so texts are compared too.
    shapes += [
        (Shape.of(16, "H100"), 1),
        (Shape.of(1, "B200"), 1),
        (Shape.of(8, "L4", 4000, 2048 * 1024**3), 1),
        (Shape.of(8, "H100", node_selector={"net": "ib"}), 500),
        (Shape.of(1, node_selector={"zone": "z"}), 1),
    ]
    told = 0
    for shape, count in shapes:
        want = plain_never_fits(view.nodes.values(), shape, count)
        assert never_fits_text(view.nodes.values(), shape, count) == want
        assert view.never_fits(shape, count) == want
        told += want is not None
    assert told >= 4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_has_free_gpus_matches_the_models_rule(seed: int) -> None:
    snap = small_snapshot(seed)
    view = CapacityView(snap.nodes, [a for a in snap.allocations.values() if a.placements])
    rng = random.Random(seed)
    model_sets = (None, (), ("H100",), ("A100", "L4"), ("B200",))
    checked = 0
    for _ in range(60):
        shape, _ = random_shape(rng)
        for models in model_sets:
            req = ReplicaRequest(shape, models=models)
            for n in view.nodes.values():
                g = shape.gpus
                want = g <= 0 or any(
                    n.free_count(m) >= g for m in _models_for(shape, models, n.free)
                )
                assert has_free_gpus(n, req) == want
                checked += want
    assert checked


def test_trial_copies_every_slot_of_the_node() -> None:
    snap = small_snapshot(1, nodes=8)
    view = CapacityView(snap.nodes, [a for a in snap.allocations.values() if a.placements])
    view.index(())  # the nodes join an index: the copy must not
    released = 0
    for n in view.nodes.values():
        t = n.trial([])
        for name in NodeCapacity.__slots__:
            if name == "indexes":
                assert t.indexes == [] and (n.indexes or not n.schedulable)
            elif name == "free":
                assert t.free == n.free and t.free is not n.free
                assert all(t.free[m] is not v for m, v in n.free.items())
            else:
                assert getattr(t, name) == getattr(n, name), name
        held = [i for i in sorted(n.healthy) if all(i not in v for v in n.free.values())]
        if held:
            t = n.trial([(held[:1], 1000, 1024)])
            assert t.cpu_free == n.cpu_free + 1000 and t.mem_free == n.mem_free + 1024
            assert held[0] in t.free[n.gpu_models[held[0]]] and t.free != n.free
            released += 1
    assert released


def plain_allowed(search: _Search, top: float) -> list[str]:
    """`_Search._allowed`: every victim judged on its own, in victim order."""
    out = []
    for v in search.pool.ordered:
        if v.priority > top:
            break
        if search._admissible(v):
            out.append(v.id)
    return out


def requests(rng: random.Random, n: int) -> list[Allocation]:
    out = []
    for i in range(n):
        shape, count = random_shape(rng)
        out.append(
            Allocation(
                id=f"probe-{i}",
                tenant=rng.choice((*TENANTS, "batch", "adhoc")),
                count=count,
                shape=shape,
                priority=rng.choice((-1, 0, 0, 5, 10)),
                create_time=1_000_000.0 - rng.uniform(0, 7200),
                seq=rng.randint(1, 600),
            )
        )
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_victims_judged_per_class_match_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    snap = small_snapshot(seed)
    # Running work at several priorities, some of it the requesters' own tenants'.
    allocs = {}
    for a in snap.allocations.values():
        if a.state == AllocationState.ALLOCATED:
            a = dataclasses.replace(
                a,
                priority=rng.choice((0, 0, 5)),
                tenant=rng.choice(TENANTS),
                seq=rng.randint(1, 600),
            )
        allocs[a.id] = a
    quotas = dict(snap.quotas)
    for t, within, reclaim in (
        ("adhoc", WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY, ReclaimPolicy.ANY),
        ("lab", WithinTenantPreemption.NEVER, ReclaimPolicy.LOWER_PRIORITY),
    ):
        base = quotas.get(t) or Quota(t)
        quotas[t] = dataclasses.replace(
            base, within_tenant_preemption=within, reclaim_from_others=reclaim
        )
    snap = dataclasses.replace(snap, allocations=allocs, quotas=quotas)
    ledger = Ledger(snap)
    view = CapacityView(snap.nodes, [a for a in allocs.values() if a.placements])
    pool = VictimPool(snap, ledger)
    # Some victims already chosen this cycle, including whole classes' first members.
    pool.taken.update(v.id for v in pool.ordered if rng.random() < 0.2)
    pool.taken.update(members[0].id for _, _, members in pool.classes[::3])
    compared = 0
    for i, req in enumerate(requests(rng, 40)):
        if i == 20:  # more chosen mid-cycle: no search may reuse a set that holds them
            pool.taken.update(v.id for v in pool.ordered[::7])
        policy = Policy.of(quotas.get(req.tenant))
        for mode in Mode:
            s = _Search(view, ledger, pool, req, mode, None, None, policy)
            top = s._max_victim_priority()
            want = plain_allowed(s, top)
            assert [v.id for v in s.allowed] == want, (req.tenant, req.priority, mode)
            assert s.allowed_ids == set(want)
            on, nodes = s._allowed_set.by_node()
            assert nodes == sorted({nid for v in s.allowed for nid in v.on_node})
            for nid in nodes:
                assert on[nid] == [v for v in pool.by_node[nid] if v.id in s.allowed_ids]
            compared += bool(want)
    assert compared > 10
