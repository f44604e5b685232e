"""The scheduler's shortcuts answer exactly what the plain computations they replace do.

Each shortcut (nodes grouped by kind for `never_fits_text`, victims judged once per
class in `_Search._allowed`, the written-out `has_free_gpus`, the ledger's remembered
guarantee and queue scores, CPU-only scans skipping nodes known to lack room, the victim
bound from running sums) is compared with the plain
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
    Placement,
    Quota,
    ReclaimPolicy,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.fairshare import Amount, Ledger
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


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_remembered_guarantee_and_queue_scores_match_the_plain_ones(seed: int) -> None:
    """`Ledger.within_guarantee` and `queue_score` answer from a memo until a usage
    version on the chain moves; after every kind of change (held, leaving, either sign,
    own work of a parent) they must equal `_within_guarantee` and `_queue_score`."""
    rng = random.Random(seed)
    snap = small_snapshot(seed)
    quotas = dict(snap.quotas)
    # Guarantees on a parent and in CPU too, so ancestors' and other resources' rules bind.
    quotas["org2"] = dataclasses.replace(
        quotas["org2"], guaranteed=dataclasses.replace(quotas["org2"].guaranteed, gpus=40)
    )
    quotas["lab"] = dataclasses.replace(
        quotas["lab"],
        guaranteed=dataclasses.replace(quotas["lab"].guaranteed, cpu_millis=200_000),
    )
    ledger = Ledger(dataclasses.replace(snap, quotas=quotas))
    tenants = sorted(set(ledger.tree.parent))
    asks = [Amount.of_request(a) for a in requests(rng, 30)]
    asks.append(Amount(3, 0, 0, {"H100": 3}))
    placed = list(ledger.placed.values())
    compared = hits = 0
    for step in range(120):
        for t in tenants:
            for ask in rng.sample(asks, 6):
                before = len(ledger._within_memo)
                got = ledger.within_guarantee(t, ask)
                hits += len(ledger._within_memo) == before
                assert got == ledger._within_guarantee(t, ask), (step, t, ask)
                vec = ask.vector()
                for own in (False, True):
                    assert ledger.queue_score(t, own, vec) == ledger._queue_score(t, own, vec)
                compared += 1
        # One change of usage, of every kind the cycle makes.
        who = rng.choice(tenants)
        amt = rng.choice(placed + asks)
        kind = rng.randrange(4)
        if kind == 0:
            ledger.add_held(who, amt)
        elif kind == 1:
            ledger.add_held(who, amt, -1)
        elif kind == 2:
            ledger.add_leaving(who, amt)
        else:
            ledger.add_leaving(who, amt, -1)
    assert compared > 1000 and hits > 100


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cpu_only_scan_skipping_short_nodes_matches_a_full_scan(seed: int) -> None:
    """CPU-only placement skips nodes remembered to lack CPU or memory (`_short`); through
    takes, gives and discarded trials it must choose what a scan with nothing remembered
    chooses, and every remembered node must really lack room."""
    rng = random.Random(seed)
    snap = small_snapshot(seed, nodes=40)
    view = CapacityView(snap.nodes, [a for a in snap.allocations.values() if a.placements])
    gib = 1024**3
    shapes = [Shape.of(0, "", c, m) for c in (4000, 16_000, 40_000) for m in (16 * gib, 300 * gib)]
    shapes.append(Shape.of(0, "", 8000, 32 * gib, {"zone": "a"}))
    placed: list[Placement] = []
    skipped = compared = 0
    for _ in range(300):
        shape = rng.choice(shapes)
        remembered = {k: set(v) for k, v in view._short.items()}
        for (cpu, mem), nids in remembered.items():
            for nid in nids:
                n = view.nodes[nid]
                assert n.cpu_free < cpu or n.mem_free < mem
        skipped += sum(map(len, remembered.values()))
        got = view.find_node(shape)
        view._short.clear()
        want = view.find_node(shape)
        view._short = remembered
        assert (got and got[0].id) == (want and want[0].id)
        compared += 1
        op = rng.random()
        if op < 0.6:
            gang = view.place_gang(shape, rng.choice((1, 2)))
            if gang:
                placed.extend(gang)
        elif op < 0.8 and placed:
            p = placed.pop(rng.randrange(len(placed)))
            view.give(p.node_id, p.gpu_indices, 4000, 16 * gib)  # a partial leave
        else:
            st = view.statement()
            view.place_gang(rng.choice(shapes), 3)
            st.discard()
    assert compared == 300 and skipped > 100


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_victim_bound_from_running_sums_matches_the_sorting_one(seed: int) -> None:
    """`_Search._bound` (running sums kept per node, bisected) against `_lower_bound`
    (sorting the node's victims each time), on every candidate node, as the view fills."""
    rng = random.Random(seed)
    snap = small_snapshot(seed)
    ledger = Ledger(snap)
    view = CapacityView(snap.nodes, [a for a in snap.allocations.values() if a.placements])
    pool = VictimPool(snap, ledger)
    compared = finite = infinite = 0
    for req in requests(rng, 60):
        # Some CPU- and memory-hungry asks too, so every resource's bound is exercised.
        if rng.random() < 0.3:
            req = dataclasses.replace(
                req, shape=dataclasses.replace(req.shape, cpu_millis=rng.choice((60_000, 95_000)))
            )
        s = _Search(view, ledger, pool, req, Mode.PRIORITY, None, None, Policy())
        on, nodes = s._allowed_set.by_node()
        for nid in nodes:
            n = view.nodes[nid]
            want = s._lower_bound(n, on[nid])
            assert s._bound(n, s._allowed_set.sums_on(nid)) == want, (req.shape, nid)
            compared += 1
            finite += 0 < want < float("inf")
            infinite += want == float("inf")
        view.place_gang(req.shape, 1)  # the view fills between searches
    assert compared > 1000 and finite > 100 and infinite > 10
