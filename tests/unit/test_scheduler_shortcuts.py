"""More scheduler shortcuts, each against the plain computation it replaces (hypothesis).

- `Ledger.__init__` sums amounts and counts per tenant before walking the tree; compared
  with the walk per allocation (values and the order tables get their keys in).
- `Ledger.within_guarantee` answers False at once for a tenant whose own quota
  guarantees nothing positive; compared with `_within_guarantee` through usage changes.
- `Ledger.limit_block` skips levels whose limit bounds nothing; compared with reading
  every level.
- `AllowedVictims` built from the pool's last set keeps the lists and running sums of the
  nodes none of whose victims left; compared with sets built from scratch as victims
  are taken.
- The cycle's per-tenant `Policy`, its request amounts shared by requests alike (never
  changed by the pass), its fair-share notes made once per tenant, and its start-of-pass
  view made from node copies; compared with `Policy.of`, `Amount.of_request`, a note per
  request and a view built from the snapshot.

`test_scheduler_decisions_digest` checks that whole cycles still decide the same.
"""

from __future__ import annotations

import dataclasses
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc.model import (
    Allocation,
    AllocationState,
    BorrowingPreemption,
    Placement,
    Quota,
    ReclaimPolicy,
    Reservation,
    ReservationState,
    Resources,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.cycle import _Cycle
from rmgrpc.scheduler.fairshare import DIMS, Amount, Ledger, QuotaBlock, _limit_dims
from rmgrpc.scheduler.placement import CapacityView
from rmgrpc.scheduler.preemption import AllowedVictims, Mode, Policy, VictimPool, _Search
from rmgrpc.scheduler.reservations import Reserved
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot
from tests.bench.scheduler_bench import CASES, build_snapshot, random_shape

NOW = 1_000_000.0
GIB = 1024**3
TENANTS = ("a", "a/x", "a/y", "a/x/deep", "b", "b/z", "c")
MODELS = ("H100", "A100")


@st.composite
def resources(draw: st.DrawFn, *, positive: bool) -> Resources:
    """A guarantee or limit: unset, zero or some amount per resource, sometimes per model."""
    low = 1 if positive else 0
    amount = st.one_of(st.none(), st.just(0), st.integers(low, 24))
    by_model = draw(st.dictionaries(st.sampled_from(MODELS), st.integers(0, 12), max_size=2))
    return Resources(
        gpus=draw(amount),
        cpu_millis=draw(
            st.one_of(st.none(), st.just(0), st.integers(1, 200).map(lambda c: c * 1000))
        ),
        memory_bytes=draw(st.one_of(st.none(), st.just(0), st.just(64 * GIB))),
        gpus_by_model=by_model,
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    """A few nodes, quotas on some tenants of a small tree, and allocations in every state
    that counts: pending, allocated, preempted in and past their grace, released."""
    nodes = {}
    for i in range(draw(st.integers(1, 4))):
        model = draw(st.sampled_from(MODELS))
        nodes[f"n{i}"] = make_node(f"n{i}", 8, model, cpu_millis=96_000, memory_bytes=1024 * GIB)
    quotas = {}
    for t in draw(st.lists(st.sampled_from(TENANTS), unique=True, max_size=len(TENANTS))):
        quotas[t] = Quota(
            t,
            guaranteed=draw(resources(positive=False)),
            limit=draw(resources(positive=True)),
            weight=draw(st.sampled_from((0.0, 0.5, 1.0, 2.0))),
        )
    allocations = {}
    states = st.sampled_from(("pending", "allocated", "preempted", "gone", "released"))
    n = draw(st.integers(0, 24))
    ids = draw(st.lists(st.integers(0, 999), min_size=n, max_size=n, unique=True))
    for i in ids:
        tenant = draw(st.sampled_from(TENANTS))
        gpus = draw(st.integers(0, 4))
        model = draw(st.sampled_from(("", *MODELS)))
        shape = Shape.of(gpus, model, draw(st.sampled_from((0, 4000))), 16 * GIB)
        count = draw(st.integers(0 if gpus else 1, 2))
        kind = draw(states)
        a = Allocation(
            id=f"x{i:03d}",
            tenant=tenant,
            count=count,
            shape=shape,
            priority=draw(st.integers(-1, 2)),
            create_time=NOW - 600,
            seq=i + 1,
        )
        if kind != "pending":
            nid = draw(st.sampled_from(sorted(nodes)))
            first = draw(st.integers(0, 8 - gpus))
            placements = tuple(
                Placement(nid, tuple(range(first, first + gpus))) for _ in range(max(count, 1))
            )
            state = {
                "allocated": AllocationState.ALLOCATED,
                "preempted": AllocationState.PREEMPTED,
                "gone": AllocationState.PREEMPTED,
                "released": AllocationState.RELEASED,
            }[kind]
            a = Allocation(
                id=a.id,
                tenant=tenant,
                count=max(count, 1),
                shape=shape,
                priority=a.priority,
                state=state,
                placements=placements,
                create_time=a.create_time,
                allocate_time=NOW - draw(st.floats(0, 7200)),
                grace_end_time=NOW + (30 if kind == "preempted" else -30)
                if state == AllocationState.PREEMPTED
                else None,
                seq=a.seq,
            )
        allocations[a.id] = a
    config = SchedulerConfig(fair_share_half_life_seconds=draw(st.sampled_from((0.0, 3600.0))))
    return Snapshot(now=NOW, nodes=nodes, allocations=allocations, quotas=quotas, config=config)


def _bump(table: dict[str, Amount], t: str, amt: Amount) -> None:
    table.setdefault(t, Amount()).add(amt)


def walk_per_allocation(snap: Snapshot, ledger: Ledger) -> dict[str, object]:
    """The ledger's tables as the walk per allocation (before per-tenant sums) built them."""
    held: dict[str, Amount] = {}
    leaving: dict[str, Amount] = {}
    pending: dict[str, Amount] = {}
    own_held: dict[str, Amount] = {}
    own_pending: dict[str, Amount] = {}
    running: dict[str, int] = {}
    waiting: dict[str, int] = {}
    total = Amount()
    for a in sorted(snap.allocations.values(), key=lambda a: a.id):
        chain = ledger.tree.chain(a.tenant)
        if a.holds_capacity(snap.now):
            amt = Amount.of_placed(a, ledger.gpu_models)
            total.add(amt)
            _bump(own_held, a.tenant, amt)
            for t in chain:
                _bump(held, t, amt)
            if a.state == AllocationState.PREEMPTED:
                for t in chain:
                    _bump(leaving, t, amt)
            for t in chain:
                running[t] = running.get(t, 0) + 1
        elif a.state == AllocationState.PENDING:
            amt = Amount.of_request(a)
            _bump(own_pending, a.tenant, amt)
            for t in chain:
                _bump(pending, t, amt)
                waiting[t] = waiting.get(t, 0) + 1
    return {
        "held": held,
        "leaving": leaving,
        "pending": pending,
        "own_held": own_held,
        "own_pending": own_pending,
        "running": running,
        "waiting": waiting,
        "held_total": total,
    }


def _plain(x: object) -> object:
    """Tables as comparable values, keys in their order (an Amount's models as a dict)."""
    if isinstance(x, Amount):
        return (x.gpus, x.cpu, x.mem, x.models)
    if isinstance(x, dict):
        return [(k, _plain(v)) for k, v in x.items()]
    return x


@settings(max_examples=60, deadline=None)
@given(snapshots())
def test_ledger_tables_match_the_walk_per_allocation(snap: Snapshot) -> None:
    ledger = Ledger(snap)
    want = walk_per_allocation(snap, ledger)
    for name, table in want.items():
        assert _plain(getattr(ledger, name)) == _plain(table), name


@settings(max_examples=60, deadline=None)
@given(snapshots(), st.data())
def test_within_guarantee_shortcut_matches_the_plain_rule(
    snap: Snapshot, data: st.DataObject
) -> None:
    """Through usage changes of every kind, for every tenant and random asks (some per
    model, some of one resource only), the remembered and short-cut answer equals the
    plain one; tenants without a positive guarantee of their own are always False."""
    ledger = Ledger(snap)
    tenants = sorted(set(ledger.tree.parent) | set(TENANTS))
    asks = [
        Amount(g, c, m, {model: g} if model and g else {})
        for g, c, m, model in data.draw(
            st.lists(
                st.tuples(
                    st.integers(0, 6),
                    st.sampled_from((0, 4000)),
                    st.sampled_from((0, 16 * GIB)),
                    st.sampled_from(("", *MODELS)),
                ),
                min_size=1,
                max_size=6,
            )
        )
    ]
    for _ in range(data.draw(st.integers(1, 6))):
        for t in tenants:
            for ask in asks:
                got = ledger.within_guarantee(t, ask)
                assert got == ledger._within_guarantee(t, ask), (t, ask)
                if not ledger._guarantees_something(t):
                    assert got is False
        who = data.draw(st.sampled_from(tenants))
        amt = data.draw(st.sampled_from(asks))
        sign = data.draw(st.sampled_from((1, -1)))
        if data.draw(st.booleans()):
            ledger.add_held(who, amt, sign)
        else:
            ledger.add_leaving(who, amt, sign)


def plain_limit_block(
    ledger: Ledger, tenant: str, amt: Amount, freed: dict[str, Amount] | None = None
) -> QuotaBlock | None:
    """`Ledger.limit_block` reading every level of the chain."""
    for t in ledger.tree.chain(tenant):
        lim = ledger.tree.limit(t)
        held = ledger.held_of(t)
        if freed is not None and t in freed:
            held = held.minus(freed[t])
        for dim, have, ask, cap in zip(
            DIMS, held.vector(), amt.vector(), _limit_dims(lim), strict=True
        ):
            if cap is not None and ask > 0 and have + ask > cap:
                return QuotaBlock(t, tenant, dim, "", have, cap, ask)
        for m, ask in sorted(amt.models.items()):
            cap = lim.gpus_by_model.get(m)
            have = held.models.get(m, 0)
            if cap is not None and ask > 0 and have + ask > cap:
                return QuotaBlock(t, tenant, "gpus", m, have, cap, ask)
    return None


@settings(max_examples=60, deadline=None)
@given(snapshots(), st.data())
def test_limit_block_skipping_unbounded_levels_matches_reading_all(
    snap: Snapshot, data: st.DataObject
) -> None:
    ledger = Ledger(snap)
    tenants = sorted(set(ledger.tree.parent) | set(TENANTS))
    for _ in range(data.draw(st.integers(1, 5))):
        g = data.draw(st.integers(0, 30))
        model = data.draw(st.sampled_from(("", *MODELS)))
        ask = Amount(g, data.draw(st.sampled_from((0, 8000))), 0, {model: g} if model else {})
        freed = {
            t: Amount(data.draw(st.integers(0, 8)), 0, 0)
            for t in data.draw(st.lists(st.sampled_from(tenants), max_size=3))
        }
        for t in tenants:
            assert ledger.limit_block(t, ask) == plain_limit_block(ledger, t, ask)
            assert ledger.limit_block(t, ask, freed) == plain_limit_block(ledger, t, ask, freed)
        ledger.add_held(data.draw(st.sampled_from(tenants)), ask)


def small_bench(seed: int, grace: float = 30.0, reservations: bool = False) -> Snapshot:
    """The bench's preemption case at a small scale (optionally with reservations)."""
    case = CASES["preemption"]
    config = SchedulerConfig(
        min_runtime_seconds=60, preemption_grace_seconds=grace, max_preemptions_per_cycle=16
    )
    snap = build_snapshot(40, 160, 120, seed, config, case.running_tenants, (0, 0, 5))
    if not reservations:
        return snap
    rng = random.Random(seed)
    free = sorted(snap.nodes)[-6:]
    res = {}
    for i, nid in enumerate(free[:3]):
        start = snap.now + rng.choice((-60, 600))
        node = snap.nodes[nid]
        res[f"r{i}"] = Reservation(
            id=f"r{i}",
            tenant=rng.choice(("lab", "batch")),
            shape=Shape.of(2, node.gpus[0].model, 8000, 64 * GIB),
            count=1,
            start_time=start,
            end_time=start + 3600,
            state=ReservationState.ACTIVE if start <= snap.now else ReservationState.SCHEDULED,
            placements=(Placement(nid, (6, 7)),),
        )
    return dataclasses.replace(snap, reservations=res)


def _same_as_from_scratch(got: AllowedVictims) -> None:
    fresh = AllowedVictims(list(got.victims))
    on, nodes = got.by_node()
    want_on, want_nodes = fresh.by_node()
    assert nodes == want_nodes
    assert on == want_on
    for nid in nodes:
        assert got.sums_on(nid) == fresh.sums_on(nid), nid


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.data())
def test_derived_victim_sets_match_sets_built_from_scratch(seed: int, data: st.DataObject) -> None:
    """Searches alike and not, with victims taken between them (as a cycle takes them):
    every set's nodes, lists and running sums equal those of a set built from its victims
    alone. A search repeated after some of its victims were taken gets a derived set."""
    snap = small_bench(seed)
    ledger = Ledger(snap)
    view = CapacityView(snap.nodes, [a for a in snap.allocations.values() if a.placements])
    pool = VictimPool(snap, ledger)
    rng = random.Random(seed)
    for i in range(10):
        shape, count = random_shape(rng)
        req = Allocation(
            id=f"probe-{i}",
            tenant=rng.choice(("lab", "org1/train", "batch", "adhoc")),
            count=count,
            shape=shape,
            priority=rng.choice((0, 5, 10)),
            create_time=snap.now,
            seq=10_000 + i,
        )
        mode = data.draw(st.sampled_from(list(Mode)))
        s = _Search(view, ledger, pool, req, mode, None, None, Policy())
        last = pool.last_allowed is s._allowed_set
        # Compared now, its lists are built before the next set is derived from it;
        # otherwise that one builds its own (both ways are taken).
        if data.draw(st.booleans()):
            _same_as_from_scratch(s._allowed_set)
        # Victims chosen by the cycle (some of this search's, some anyone's).
        took = rng.sample(s.allowed, min(len(s.allowed), data.draw(st.integers(0, 3))))
        took += rng.sample(pool.ordered, data.draw(st.integers(0, 2)))
        pool.taken.update(v.id for v in took)
        again = _Search(view, ledger, pool, req, mode, None, None, Policy())._allowed_set
        _same_as_from_scratch(again)
        _same_as_from_scratch(s._allowed_set)
        if last and again.victims and {v.id for v in took} & s.allowed_ids:
            assert again._dirty is not None  # derived from the search's set


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from((0.0, 30.0)), st.booleans())
def test_cycle_policies_amounts_and_start_view_match_the_plain_ones(
    seed: int, grace: float, reservations: bool
) -> None:
    snap = small_bench(seed, grace, reservations)
    rng = random.Random(seed)
    quotas = dict(snap.quotas)
    for t in ("lab", "org1/train", "batch"):
        quotas[t] = dataclasses.replace(
            quotas.get(t) or Quota(t),
            within_tenant_preemption=rng.choice(list(WithinTenantPreemption)),
            reclaim_from_others=rng.choice(list(ReclaimPolicy)),
            preemption_while_borrowing=rng.choice(list(BorrowingPreemption)),
            borrowing_max_priority=rng.choice((0, 5)),
        )
    snap = dataclasses.replace(snap, quotas=quotas)
    cy = _Cycle(snap)
    cy.run()
    # Policies: one per tenant, as Policy.of makes them.
    for t in sorted({a.tenant for a in snap.allocations.values()} | set(quotas)):
        assert cy._policy(t) == Policy.of(quotas.get(t))
    # Amounts: shared by requests alike, and still what each request asks after the pass.
    pending = [a for a in snap.allocations.values() if a.state == AllocationState.PENDING]
    for a in pending:
        amt = cy.amount(a)
        want = Amount.of_request(a)
        assert (amt.gpus, amt.cpu, amt.mem, amt.models) == (
            want.gpus,
            want.cpu,
            want.mem,
            want.models,
        )
    assert len({id(cy.amount(a)) for a in pending}) < len(pending)
    # Reasons: each written with its own request's fair-share note (one per tenant is
    # kept), as `_explain` wrote them before.
    limit = snap.config.max_preemptions_per_cycle
    noted = 0
    for aid in cy.order:
        parts = [x for x in (cy.prefix.get(aid), cy.reasons.get(aid)) if x]
        key = cy.fail_keys.get(aid)
        if key is not None:
            parts.append(cy._capacity_text(key))
            note = cy._share_note(cy.by_id[aid])
            noted += bool(note)
            if note:
                parts.append(note)
        if aid in cy.budget_hit:
            parts.append(f"preemption limit of {limit} per cycle reached")
        assert cy.decisions.pending[aid].reason == ("; ".join(parts) or "waiting")
    assert noted
    # The start-of-pass view: what fitted then, as a view built from the snapshot says.
    holding = [a for a in snap.allocations.values() if a.holds_capacity(snap.now)]
    built = CapacityView(snap.nodes, holding)
    Reserved(snap.reservations, snap.nodes, holding, snap.now).withhold(built)
    for _ in range(40):
        shape, count = random_shape(rng)
        models = rng.choice((None, ("H100",), ("A100", "L4")))
        key = (shape, count, "", 0, models, math.inf)
        assert cy._fitted_at_start(key) == built.fits(shape, count, models=models), key
    start = cy._initial
    assert start is not None
    for nid, n in built.nodes.items():
        c = start.nodes[nid]
        assert (c.free, c.cpu_free, c.mem_free, c.end_time) == (
            n.free,
            n.cpu_free,
            n.mem_free,
            n.end_time,
        )
    assert [[n.id for n in m] for m in start._class_nodes] == [
        [n.id for n in m] for m in built._class_nodes
    ]
