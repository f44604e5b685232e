"""Fair-share promises that mutation testing (`make mutate`) showed no test kept.

Each test states a README/SPEC promise (Fair share, Quota) on a small case and names the
mutants of `scheduler/fairshare.py` it kills. Survivors judged harmless (equivalent: the
behaviour cannot change, or only by less than `EPS`) are listed in `tests/unit/MUTANTS.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from rmgrpc.model import Allocation, AllocationState, Node, Placement, Quota, Resources, Shape
from rmgrpc.scheduler.fairshare import (
    Amount,
    Ledger,
    QuotaBlock,
    TenantUsage,
    UsageHistory,
    check_admissible,
    order_text,
    running_weight,
    usage_from,
    water_fill,
)
from rmgrpc.scheduler.simulate import Simulator, make_node
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot

NOW = 10_000.0


def placed(
    aid: str, tenant: str, node: str, gpus: Sequence[int], cpu: int = 0, mem: int = 0
) -> Allocation:
    """A running single-replica allocation on `node`."""
    return Allocation(
        id=aid,
        tenant=tenant,
        count=1,
        shape=Shape.of(len(gpus), cpu_millis=cpu, memory_bytes=mem),
        state=AllocationState.ALLOCATED,
        placements=(Placement(node, tuple(gpus)),),
        allocate_time=NOW - 100,
    )


def asking(aid: str, tenant: str, gpus: int = 0, cpu: int = 0, mem: int = 0) -> Allocation:
    """A pending single-replica request."""
    return Allocation(
        id=aid, tenant=tenant, count=1, shape=Shape.of(gpus, cpu_millis=cpu, memory_bytes=mem)
    )


def ledger(allocs: Sequence[Allocation], quotas: Sequence[Quota] = ()) -> Ledger:
    """Two nodes of 8 H100s, 8,000 CPU millis and 10,000 bytes each: the cluster is 16
    GPUs, 16,000 millis, 20,000 bytes (small numbers keep every share exact)."""
    nodes = [make_node(f"n{i}", 8, cpu_millis=8000, memory_bytes=10_000) for i in range(2)]
    return Ledger(
        Snapshot(
            now=NOW,
            nodes={n.id: n for n in nodes},
            allocations={a.id: a for a in allocs},
            quotas={q.tenant: q for q in quotas},
            config=SchedulerConfig(),
        )
    )


def res(gpus: int, cpu: int, mem: int) -> Resources:
    return Resources(gpus=gpus, cpu_millis=cpu, memory_bytes=mem)


# ---------------------------------------------------------------------------------------
# water_fill: guarantees first, then by weight, never above demand; weight 0 only leftovers.


def test_weight_zero_gets_only_what_weighted_siblings_leave() -> None:
    """Fair share, weight 0: "only leftover capacity": a weight-0 member gets nothing
    while a weighted sibling wants more, and all that sibling leaves once its demand is
    met (kills the weight-0 branch dropped, its condition inverted or its call broken,
    and weight-0 members joining the weighted rounds)."""
    assert water_fill(8, [("a", 0, 20, 1), ("z", 0, 8, 0)]) == pytest.approx({"a": 8, "z": 0})
    assert water_fill(8, [("a", 0, 2, 1), ("z", 0, 8, 0)]) == pytest.approx({"a": 2, "z": 6})
    # Alone, a weight-0 member may use the whole idle capacity.
    assert water_fill(4, [("z", 0, 4, 0)]) == pytest.approx({"z": 4})


def test_weight_zero_members_split_leftovers_evenly_within_their_demand() -> None:
    """Fair share, weight 0: the leftover is split evenly among weight-0 members, each
    up to its demand, one with little demand leaving its part to the other (kills the
    leftover split starting from a guarantee of 1 instead of 0)."""
    got = water_fill(9, [("a", 0, 8, 1), ("z1", 0, 0.2, 0), ("z2", 0, 8, 0)])
    assert got == pytest.approx({"a": 8, "z1": 0.2, "z2": 0.8})


def test_weight_zero_with_a_guarantee_never_exceeds_its_demand() -> None:
    """Fair share never above demand: a weight-0 member's guarantee is given first, and
    the leftover tops it up only to its demand (kills its room counted as cap + share)."""
    got = water_fill(10, [("a", 0, 2, 1), ("z", 2, 4, 0)])
    assert got == pytest.approx({"a": 2, "z": 4})


def test_a_capped_member_with_a_guarantee_hands_back_exactly_its_excess() -> None:
    """Fair share: capacity a member cannot use (its demand met) goes to the others, so
    the shares add up to what is available while demand exceeds it (kills the room of a
    member that already holds its guarantee counted as cap + share)."""
    got = water_fill(10, [("a", 1, 2, 1), ("b", 0, 20, 1)])
    assert got == pytest.approx({"a": 2, "b": 8})
    assert sum(got.values()) == pytest.approx(10)


def test_guarantees_above_a_small_capacity_scale_down_proportionally() -> None:
    """Quota: guarantees that together exceed the capacity are scaled down together,
    even when they add up to less than one unit (kills the scale applied only to
    guarantees above 1)."""
    got = water_fill(0.5, [("a", 0.6, 1, 1), ("b", 0.2, 1, 1)])
    assert got == pytest.approx({"a": 0.375, "b": 0.125})


def test_no_capacity_left_to_share_gives_nobody_anything() -> None:
    """Fair share of a level whose capacity is all kept idle by lending limits (what is
    left may even be negative): every share is 0, never an error (kills the division
    by a zero sum of guarantees)."""
    assert water_fill(-1.0, [("a", 0, 5, 1), ("b", 0, 5, 2)]) == {"a": 0.0, "b": 0.0}


# ---------------------------------------------------------------------------------------
# fair_shares: what GetUsage reports as each tenant's fair share, level by level.


def test_fair_shares_split_every_resource_guarantees_first_then_by_weight() -> None:
    """Fair share is DRF across GPU, CPU and memory: in each resource guarantees come
    first, then the rest by weight, never above a tenant's demand (held plus pending).
    Kills demand/guarantee/cap/result mix-ups between CPU and memory and a unit of
    capacity lost before sharing."""
    led = ledger(
        [
            placed("b1", "b", "n0", (0, 1), cpu=1000, mem=2000),
            asking("bp", "b", cpu=2000, mem=8000),
            asking("ap", "a", gpus=20, cpu=20_000, mem=30_000),
            asking("cp", "c", gpus=20, cpu=20_000, mem=30_000),
        ],
        [Quota("a", guaranteed=Resources(cpu_millis=2000, memory_bytes=4000))],
    )
    # GPUs: b wants 2; a and c split the other 14.
    # CPU: a's 2,000 first; then 14,000 by thirds, b capped at its 3,000 (1,000 + 2,000).
    # Memory: a's 4,000 first; then 16,000 by thirds; b's demand is 10,000, not capped.
    assert led.fair["a"] == pytest.approx((7, 7500, 4000 + 16_000 / 3))
    assert led.fair["b"] == pytest.approx((2, 3000, 16_000 / 3))
    assert led.fair["c"] == pytest.approx((7, 5500, 16_000 / 3))


def test_a_parents_own_work_shares_with_its_children() -> None:
    """Fair share in a tree: a tenant's own allocations beside its children count as one
    more child of weight 1, with no guarantee: its demand is what it holds and asks
    (kills its held or pending part dropped, its share lost or mixed up between
    resources)."""
    led = ledger(
        [
            placed("o1", "org", "n0", (0, 1, 2), cpu=1000, mem=500),
            asking("op", "org", gpus=1, cpu=1000, mem=1000),
            asking("xp", "org/x", gpus=20, cpu=20_000, mem=30_000),
        ]
    )
    assert led.own_fair["org"] == pytest.approx((4, 2000, 1500))
    assert led.fair["org/x"] == pytest.approx((12, 14_000, 18_500))


def test_a_parents_own_work_has_weight_one_and_no_guarantee() -> None:
    """Fair share in a tree: the parent's own work competes as a child of weight 1 with
    no guarantee: with a busy sibling of weight 1 the two split evenly in every resource
    (kills the own work given weight 2 or a guarantee of 1 in any resource)."""
    led = ledger(
        [
            asking("op", "org", gpus=20, cpu=20_000, mem=30_000),
            asking("xp", "org/x", gpus=20, cpu=20_000, mem=30_000),
        ]
    )
    assert led.own_fair["org"] == pytest.approx((8, 8000, 10_000), rel=1e-9)
    assert led.fair["org/x"] == pytest.approx((8, 8000, 10_000), rel=1e-9)


def test_a_limit_caps_the_fair_share() -> None:
    """Quota: the fair share is never above a tenant's `limit`, a limit of 0 included
    (a tenant whose limit was lowered under what it holds); what it cannot take goes
    to the others (kills the limit ignored or read as 1 when it is 0)."""
    led = ledger(
        [
            placed("z1", "z", "n0", (0, 1)),
            asking("ap", "a", gpus=20),
            asking("bp", "b", gpus=20),
        ],
        [Quota("a", limit=Resources(gpus=4)), Quota("z", limit=Resources(gpus=0))],
    )
    assert led.fair["z"][0] == 0
    assert led.fair["a"][0] == pytest.approx(4)
    assert led.fair["b"][0] == pytest.approx(12)


def test_a_cluster_with_no_tenants_has_no_fair_shares() -> None:
    """GetUsage on a fresh cluster (nodes, no quotas, no work) answers, with nobody's
    fair share (kills the root's missing children read as None)."""
    assert ledger([]).fair == {}


def test_capacity_kept_idle_by_lending_limits_is_not_shared() -> None:
    """Quota, lending limits: what idle lenders keep beyond their lending limit is
    nobody else's fair share; what two lenders keep adds up, per resource (kills the
    kept amounts overwritten, subtracted, added or read from another resource)."""
    led = ledger(
        [asking("ap", "a", 20, 20_000, 30_000), asking("bp", "b", 20, 20_000, 30_000)],
        [
            # Keeps 3 GPUs, 1,000 millis, 2,000 bytes of its guarantee while idle.
            Quota("l1", guaranteed=res(4, 2000, 3000), lending_limit=res(1, 1000, 1000)),
            # Lends nothing: keeps all of it.
            Quota("l2", guaranteed=res(2, 1000, 1000), lending_limit=res(0, 0, 0)),
        ],
    )
    assert led.kept_idle("l1") == (3, 1000, 2000)
    # 16 - 5 GPUs, 16,000 - 2,000 millis, 20,000 - 3,000 bytes, split evenly.
    assert led.fair["a"] == pytest.approx((5.5, 7000, 8500))
    assert led.fair["b"] == pytest.approx((5.5, 7000, 8500))


# ---------------------------------------------------------------------------------------
# below_fair_share: may a request preempt by fair share?


def test_below_fair_share_judges_only_the_contended_resources_it_asks_for() -> None:
    """Preemption by fair share: a tenant still at or under its fair share *with the
    request admitted*, in each contended resource the request asks for, may take from
    tenants above theirs; a resource it does not ask for does not count (kills the
    request's amount subtracted, and unasked resources judged)."""
    led = ledger(
        [
            placed("a1", "a", "n0", (0, 1), cpu=12_000),
            asking("ap", "a", gpus=4),
            asking("bp", "b", gpus=20, cpu=20_000),
        ]
    )
    assert led.contended[:2] == (True, True)
    assert led.fair["a"][:2] == pytest.approx((6, 8000))  # over its CPU share already
    assert led.below_fair_share("a", Amount(1))
    assert led.below_fair_share("a", Amount(4))  # exactly at its share once admitted
    assert not led.below_fair_share("a", Amount(5))


def test_below_fair_share_is_false_where_nothing_is_contended() -> None:
    """Fair share only arbitrates resources the tenants together ask more of than the
    cluster has: where everyone gets what it asks, nobody preempts by fair share (kills
    the answer with no contended resource flipped to True)."""
    led = ledger([placed("a1", "a", "n0", (0, 1)), asking("ap", "a", gpus=1)])
    assert led.contended == (False, False, False)
    assert not led.below_fair_share("a", Amount(1))


def test_a_tenant_without_a_fair_share_is_never_below_it() -> None:
    """A tenant the pass has no fair share for has a share of nothing, in every
    resource (kills the missing share read as None or as 1 of a resource)."""
    led = ledger([asking("bp", "b", 20, 20_000, 30_000)])
    assert led.contended == (True, True, True)
    for ask in (Amount(1), Amount(0, 1), Amount(0, 0, 1)):
        assert not led.below_fair_share("nobody", ask)


# ---------------------------------------------------------------------------------------
# within_guarantee: does a request come first, and may it reclaim?


def test_a_guarantee_is_bounded_by_every_ancestors_explicit_guarantee() -> None:
    """Quota, "a parent's quota bounds its children": a request is inside its tenant's
    guarantee only if it is inside every explicit guarantee up the chain, past
    ancestors without a quota (kills the walk stopping at the first ancestor with no
    quota)."""
    quotas = [
        Quota("org/a/x", guaranteed=Resources(gpus=4)),
        Quota("org", guaranteed=Resources(gpus=4)),
    ]
    full = ledger([placed("b1", "org/b", "n0", (0, 1, 2, 3))], quotas)
    assert not full.within_guarantee("org/a/x", Amount(2))
    room = ledger([placed("b1", "org/b", "n0", (0, 1))], quotas)
    assert room.within_guarantee("org/a/x", Amount(2))


def test_a_cpu_guarantee_does_not_cover_a_gpu_request() -> None:
    """Quota: a request is inside the guarantee only in resources the guarantee names:
    a CPU-only guarantee makes a CPU request, not a GPU one, come first (kills resources
    the request does not ask for being counted)."""
    led = ledger([], [Quota("t", guaranteed=Resources(cpu_millis=4000))])
    assert not led.within_guarantee("t", Amount(1))
    assert led.within_guarantee("t", Amount(0, 1000))


def test_a_per_model_guarantee_is_reachable_and_bounded() -> None:
    """Quota, per-model guarantees: a tenant guaranteed 2 H100s is inside its guarantee
    for up to 2 H100s counting what it holds, one by one or together, and outside
    beyond (kills the per-model check skipped, misread, off by one or inverted)."""

    def h100(n: int) -> Amount:
        return Amount(n, models={"H100": n})

    quotas = [
        Quota("t", guaranteed=Resources(gpus_by_model={"H100": 2})),
        Quota("u", guaranteed=Resources(gpus_by_model={"H100": 1})),
    ]
    idle = ledger([], quotas)
    assert idle.within_guarantee("t", h100(1))
    assert idle.within_guarantee("t", h100(2))
    assert not idle.within_guarantee("t", h100(3))
    assert idle.within_guarantee("u", h100(1))
    busy = ledger([placed("t1", "t", "n0", (0,))], quotas)
    assert busy.within_guarantee("t", h100(1))
    assert not busy.within_guarantee("t", h100(2))


# ---------------------------------------------------------------------------------------
# lending_block: capacity a lending limit keeps idle for its tenant.


LENDERS = [
    # Keeps 4 GPUs of its guarantee while idle; l2 keeps 1; l3 keeps CPU only.
    Quota("l1", guaranteed=Resources(gpus=6), lending_limit=Resources(gpus=2)),
    Quota("l2", guaranteed=Resources(gpus=2), lending_limit=Resources(gpus=1)),
    Quota("l3", guaranteed=Resources(cpu_millis=1000), lending_limit=Resources(cpu_millis=0)),
]


def test_lending_limits_keep_idle_guarantees_free() -> None:
    """Quota, lending limit: while lenders are idle, others may not take the part of
    their guarantees they do not lend (5 GPUs here, of 12 free); a request that leaves
    exactly that much free runs, one GPU more waits with a reason naming the lenders
    (kills every change to the sum, the comparison and the reason)."""
    led = ledger([placed("x1", "x", "n0", (0, 1, 2, 3))], LENDERS)
    assert led.lending_block("a", Amount(7)) is None
    assert led.lending_block("a", Amount(8)) == (
        "capacity kept idle for the guarantee of l1, l2 (beyond its lending limit): "
        "5 GPUs of 12 GPUs free is kept, tenant a asks 8 GPUs"
    )


def test_a_single_kept_gpu_blocks_a_single_gpu_request() -> None:
    """Quota, lending limit: one kept GPU is kept from a one-GPU request, even when
    nothing else is free (kills thresholds of 1 on what is kept and what is asked)."""
    quotas = [Quota("l2", guaranteed=Resources(gpus=2), lending_limit=Resources(gpus=1))]
    led = ledger([placed("x1", "x", "n0", range(8)), placed("x2", "x", "n1", range(7))], quotas)
    assert led.lending_block("a", Amount(1)) == (
        "capacity kept idle for the guarantee of l2 (beyond its lending limit): "
        "1 GPU of 1 GPU free is kept, tenant a asks 1 GPU"
    )
    full = ledger([placed("x1", "x", "n0", range(8)), placed("x2", "x", "n1", range(8))], quotas)
    assert full.lending_block("a", Amount(1)) == (
        "capacity kept idle for the guarantee of l2 (beyond its lending limit): "
        "1 GPU of 0 GPUs free is kept, tenant a asks 1 GPU"
    )


def test_capacity_kept_for_a_tenants_own_ancestor_is_its_to_use() -> None:
    """Quota, lending limit: what a lender keeps idle is kept *for its subtree*: its
    child may use it, and only the other lenders' kept capacity holds it back (kills
    the lender's own subtree skipped wrongly, or the walk stopping at it)."""
    led = ledger([placed("x1", "x", "n0", (0, 1, 2, 3))], LENDERS)
    assert led.lending_block("l1/k", Amount(11)) is None
    assert led.lending_block("l1/k", Amount(12)) is not None  # l2's kept GPU


def test_only_what_is_kept_and_asked_for_holds_a_request_back() -> None:
    """Quota, lending limit: a request is held back only in a resource it asks for and
    a lender keeps: not by CPU kept idle when it asks GPUs only and the CPU is short,
    nor by memory nobody keeps (kills the conditions on asked and kept loosened)."""
    big = Allocation(
        id="x1",
        tenant="x",
        count=2,
        shape=Shape.of(0, cpu_millis=7750),
        state=AllocationState.ALLOCATED,
        placements=(Placement("n0", ()), Placement("n1", ())),
        allocate_time=NOW - 100,
    )
    led = ledger([big], LENDERS)
    assert led.lending_block("a", Amount(1)) is None  # 500 millis free, 1,000 kept
    assert led.lending_block("a", Amount(0, 0, 50_000)) is None  # more than the cluster


def test_kept_idle_is_the_unlent_guarantee_not_yet_used() -> None:
    """Quota, lending limit: a lender keeps (guarantee - lending limit - what its
    subtree holds), never below 0, and only in resources where it sets a lending limit;
    elsewhere it lends all (kills what it holds ignored or added, a floor or a default
    of 1, and a limit on one side only counted)."""
    quotas = [
        Quota("l1", guaranteed=Resources(gpus=6), lending_limit=Resources(gpus=2)),
        Quota("l4", guaranteed=res(2, 1000, 0), lending_limit=res(0, 0, 0)),
        Quota("l5", guaranteed=Resources(gpus=2, cpu_millis=1000), lending_limit=Resources(gpus=0)),
    ]
    led = ledger([placed("k1", "l1/k", "n0", (0, 1)), placed("l4", "l4", "n1", range(3))], quotas)
    assert led.kept_idle("l1") == (2, 0, 0)  # 6 - 2 lent - 2 its child holds
    assert led.kept_idle("l4") == (0, 1000, 0)  # holds more than it keeps; guarantees 0 bytes
    assert led.kept_idle("l5") == (2, 0, 0)  # lends all its CPU: no CPU lending limit


def test_no_cpu_is_kept_where_no_lender_keeps_cpu() -> None:
    """Quota, lending limit: lenders that keep GPUs only hold back no CPU: a request may
    take every free CPU milli (kills a kept amount starting at 1)."""
    led = ledger([placed("x1", "x", "n0", (0, 1, 2, 3))], LENDERS[:2])
    assert led.lending_block("a", Amount(0, 16_000)) is None


# ---------------------------------------------------------------------------------------
# limit_block: admission never lets a tenant exceed its limit, nor a parent its own.


def test_a_limit_binds_only_in_what_the_request_adds() -> None:
    """Quota: a tenant already over its CPU limit (the limit was lowered under it) may
    still be admitted a GPU-only request: admission never *adds* beyond a limit, and
    this request adds no CPU (kills resources the request does not ask for binding)."""
    led = ledger([placed("t1", "t", "n0", (0,), cpu=4000)], [Quota("t", limit=res(8, 2000, 0))])
    assert led.limit_block("t", Amount(1)) is None
    assert led.limit_block("t", Amount(1, 1)) is not None


def test_a_per_model_limit_blocks_one_more_gpu_and_says_whose() -> None:
    """Quota, per-model limits: at its limit of 2 H100s, one more H100 is refused, for
    the tenant and under a parent's per-model limit alike, with a reason naming the
    quota, the model and the amounts (kills a 1-GPU ask slipping through and every
    field of the per-model block)."""
    quotas = [
        Quota("t", limit=Resources(gpus_by_model={"H100": 2})),
        Quota("org", limit=Resources(gpus_by_model={"H100": 2})),
    ]
    led = ledger([placed("t1", "t", "n0", (0, 1)), placed("o1", "org/a", "n1", (0, 1))], quotas)
    own = led.limit_block("t", Amount(1, models={"H100": 1}))
    assert own is not None
    assert own.text() == "over quota of tenant t: holds 2 of limit 2 H100 GPUs, asks 1 H100 GPU"
    parent = led.limit_block("org/b", Amount(1, models={"H100": 1}))
    assert parent is not None
    assert parent.text() == (
        "parent quota `org` full: its subtree holds 2 of limit 2 H100 GPUs, "
        "tenant org/b asks 1 H100 GPU"
    )


# ---------------------------------------------------------------------------------------
# slack: how much fair-share reclaim may take from a tenant above its share.


def _reclaim(holdings: Sequence[tuple[str, int]], gpus: int) -> set[str]:
    """Tenants each holding 1-GPU allocations (listed oldest first, the last ones
    newest) fill the cluster; tenant c asks `gpus` at the same priority: whom does
    fair-share reclaim preempt?"""
    total = sum(n for _, n in holdings)
    config = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=0)
    s = Simulator([make_node("n1", total)], (), config)
    gpu = 0
    for tenant, n in holdings:
        for _ in range(n):
            a = s.submit(tenant, Shape.of(1), alloc_id=f"{tenant}{gpu}")
            a.state = AllocationState.ALLOCATED
            a.placements = (Placement("n1", (gpu,)),)
            a.allocate_time = s.now - 1000 + gpu  # later in the list: newer
            gpu += 1
    s.submit("c", Shape.of(gpus))
    return {p.allocation_id for p in s.step().preemptions}


def test_fair_share_reclaim_keeps_a_fractional_gpu_share_rounded_down() -> None:
    """Preemption by fair share: GPUs are whole, so a tenant over a share of 1.5 GPUs
    gives back down to 1: with a and b at 2 GPUs each of 4 and c idle, c takes one
    (kills the GPU share kept fractional, which leaves nothing to take)."""
    assert len(_reclaim([("a", 2), ("b", 2)], 1)) == 1


def test_fair_share_reclaim_never_takes_a_tenant_below_a_whole_share() -> None:
    """Preemption by fair share takes only from tenants that stay at or above their
    own share: b at exactly its share of 2 keeps both GPUs, though they are the newest;
    a, over its share, gives one (kills the share rounded down by one when it is
    whole)."""
    assert _reclaim([("a", 4), ("b", 2)], 1) == {"a3"}


# -- the queue's order (FairQueue, Ledger.queue_score) ---------------------------------

NO_WAIT = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=0)


def sim(gpus: int, quotas: Sequence[Quota] = (), cpu: int = 32_000) -> Simulator:
    """One node of `gpus` H100s and `cpu` millis."""
    return Simulator([make_node("n1", gpus, cpu_millis=cpu)], quotas, NO_WAIT)


def running(
    s: Simulator, tenant: str, gpus: Sequence[int], *, cpu: int = 0, priority: int = 0
) -> Allocation:
    """A running allocation on n1, placed long ago."""
    a = s.submit(tenant, Shape.of(len(gpus), cpu_millis=cpu), priority=priority)
    a.state = AllocationState.ALLOCATED
    a.placements = (Placement("n1", tuple(gpus)),)
    a.allocate_time = s.now - 1000
    return a


def admitted(s: Simulator) -> list[str]:
    return [a.allocation_id for a in s.step().admissions]


def test_a_tenant_within_its_guarantee_comes_before_a_borrower() -> None:
    """Fair share: "a tenant under its guaranteed quota always comes before borrowers",
    even when its dominant share (its CPU) is far above the borrower's: g asks 2 GPUs
    within its guarantee of 4, b (no guarantee) asks 2 first; one fits (kills the
    guarantee standing dropped from the queue's key, at the tenant or at the root)."""
    s = sim(4, [Quota("g", guaranteed=Resources(gpus=4))])
    running(s, "g", [0], cpu=30_000)
    running(s, "x", [1], priority=9)
    b = s.submit("b", Shape.of(2))
    g = s.submit("g", Shape.of(2))
    assert admitted(s) == [g.id]
    assert (g.state, b.state) == (AllocationState.ALLOCATED, AllocationState.PENDING)


def test_a_tenant_below_its_fair_share_comes_before_one_at_it() -> None:
    """Fair share: levels below their fair share are served first (the quota rule that
    keeps each within one allocation of it): a and b (equal weight) may each have 2 of
    the 4 GPUs left beside c's guaranteed 4. b holds its 2, a none; a's dominant share
    with its request (its CPU, 94 %) is above b's (38 %), yet a goes first (kills the
    "below its fair share" rank dropped or misjudged, or not judged for a 1-GPU ask)."""
    s = sim(8, [Quota("c", guaranteed=Resources(gpus=4))])
    running(s, "c", [0, 1, 2, 3])
    running(s, "b", [4, 5])
    running(s, "a", [], cpu=30_000)
    b = s.submit("b", Shape.of(1))
    a = s.submit("a", Shape.of(2))
    d = s.step()
    assert [x.allocation_id for x in d.admissions] == [a.id]
    assert d.preemptions == []
    assert b.id in d.pending


def test_a_parents_own_request_competes_by_its_own_usage() -> None:
    """Hierarchical fair share: a parent's own work is one member among its children,
    ranked by what the parent holds itself: p holds 2 GPUs of its own, its child p/c
    none; of their two requests (p's first) one fits, and p/c's goes (kills the own
    work's score dropped, or read as the whole subtree's)."""
    s = sim(4)
    running(s, "p", [0, 1])
    running(s, "x", [2], priority=9)
    own = s.submit("p", Shape.of(1))
    child = s.submit("p/c", Shape.of(1))
    assert admitted(s) == [child.id]
    assert own.state == AllocationState.PENDING


def test_a_tenant_whose_request_waits_is_ranked_by_its_next_one() -> None:
    """Fair share, "in order of priority": a's priority-5 request cannot fit and waits;
    a's next request (priority 0) then ranks by its own priority, after b's priority-1
    request (kills the waiting tenant not re-keyed before the next pop)."""
    s = sim(2)
    running(s, "x", [0], priority=9)
    s.submit("a", Shape.of(2), priority=5)
    a2 = s.submit("a", Shape.of(1), priority=0)
    b1 = s.submit("b", Shape.of(1), priority=1)
    assert admitted(s) == [b1.id]
    assert a2.state == AllocationState.PENDING


def test_a_parents_rank_rises_as_its_children_are_admitted() -> None:
    """Hierarchical fair share: "siblings divide their parent's entitlement by weight,
    level by level": once p/a is admitted, p's subtree holds one GPU and its sibling q
    (none) goes before p/b, though p/b asked first (kills the parent's score kept from
    before its child's admission)."""
    s = sim(3)
    running(s, "x", [0], priority=9)
    pa = s.submit("p/a", Shape.of(1))
    s.submit("p/b", Shape.of(1))
    q = s.submit("q", Shape.of(1))
    assert admitted(s) == [pa.id, q.id]


# -- usage that decays (UsageHistory, running_weight) -----------------------------------


def decayed(amount: float, start: float, end: float, now: float, half_life: float) -> float:
    """Slurm's decayed usage of holding `amount` over [start, end], seen at `now`:
    amount * (2^-(now-end)/h - 2^-(now-start)/h)."""
    return amount * (2 ** (-(now - end) / half_life) - 2 ** (-(now - start) / half_life))


def test_ended_usage_decays_on_the_half_life() -> None:
    """Usage decays with the configured half-life: 8 GPUs held for one half-life count
    4 when they end, 2 one half-life later, 1 after two; CPU and memory alike (kills
    the decay rate, the running weight or the scaling mis-computed)."""
    h = UsageHistory(100.0)
    h.ended("t", (8, 8000, 8e9), 0.0, 100.0)
    for now, want in ((100.0, 4.0), (200.0, 2.0), (300.0, 1.0)):
        got = h.values(now)["t"]
        assert got == pytest.approx((want, want * 1000, want * 1e9))
    assert running_weight(100.0, math.log(2) / 100.0) == pytest.approx(0.5)
    assert running_weight(-5.0, 1.0) == 0.0  # no time held, nothing counts


def test_intervals_add_up_in_any_order() -> None:
    """Decayed usage is the sum of each interval's own decayed usage, whichever order
    the intervals end in (a restart replays them in store order): the intervals here
    are given out of order and overlapping (kills an earlier-ended interval decayed
    from the wrong time, or the running sum not scaled to the later end)."""
    intervals = [(2.0, 50.0, 150.0), (4.0, 0.0, 40.0), (1.0, 100.0, 260.0), (3.0, 10.0, 30.0)]
    h = UsageHistory(60.0)
    for amount, start, end in intervals:
        h.ended("t", (amount, 0, 0), start, end)
        h.ended("u", (0, amount, 0), start, end)
    want = sum(decayed(a, s, e, 300.0, 60.0) for a, s, e in intervals)
    assert h.values(300.0)["t"][0] == pytest.approx(want)
    assert h.values(300.0)["u"][1] == pytest.approx(want)
    assert h.values(300.0)["t"][1:] == (0.0, 0.0)


def test_no_half_life_or_no_time_held_records_nothing() -> None:
    """A half-life of 0 orders by what is held now only; an interval of no length
    holds nothing; negligible leftovers are dropped (kills the guards of `ended` and
    the cut-offs of `values`)."""
    off = UsageHistory(0.0)
    off.ended("t", (8, 0, 0), 0.0, 100.0)
    assert off.values(100.0) == {}
    short = UsageHistory(1.0)  # any positive half-life decays, a second's too
    short.ended("t", (8, 0, 0), 0.0, 1.0)
    assert short.values(1.0) == {"t": pytest.approx((4.0, 0.0, 0.0))}
    h = UsageHistory(10.0)
    h.ended("t", (8, 0, 0), 50.0, 50.0)
    h.ended("u", (8, 0, 0), 60.0, 40.0)
    assert h.values(60.0) == {}
    # Held for one half-life: half of each counts when it ends. Each is above its own
    # cut-off (a millionth of a GPU, a thousandth of a milli, one byte) and only there.
    h.ended("gpu", (1, 0, 0), 0.0, 10.0)
    h.ended("cpu", (0, 1, 0), 0.0, 10.0)
    h.ended("mem", (0, 0, 3), 0.0, 10.0)
    assert h.values(10.0) == {
        "gpu": pytest.approx((0.5, 0.0, 0.0)),
        "cpu": pytest.approx((0.0, 0.5, 0.0)),
        "mem": pytest.approx((0.0, 0.0, 1.5)),
    }
    assert h.values(20.0) == {
        "gpu": pytest.approx((0.25, 0.0, 0.0)),
        "cpu": pytest.approx((0.0, 0.25, 0.0)),
    }
    assert h.values(500.0) == {}  # 49 half-lives later: negligible, dropped


# -- requests that can never fit their limits (check_admissible) -----------------------


def admissible(request: Allocation, quotas: Sequence[Quota], models: Sequence[str]) -> str | None:
    nodes = [make_node(f"n{i}", 4, m) for i, m in enumerate(models)]
    snap = Snapshot(
        now=NOW,
        nodes={n.id: n for n in nodes},
        allocations={},
        quotas={q.tenant: q for q in quotas},
        config=SchedulerConfig(),
    )
    return check_admissible(snap, request)


def test_a_request_over_a_per_model_limit_is_refused_with_both_amounts() -> None:
    """Quota per GPU model: a request naming a model beyond its tenant's (or a parent's)
    limit for that model is refused at once, and the reason names both amounts and the
    model; exactly the limit is admissible, and a model the limit does not name is not
    limited (kills the comparison, the missing-model guard and the text's arguments)."""
    quotas = [Quota("org", limit=Resources(gpus_by_model={"H100": 2, "A100": 1}))]
    ask = Allocation(id="r", tenant="org/t", count=3, shape=Shape.of(1, "H100"))
    assert admissible(ask, quotas, ["H100"]) == (
        "request needs 3 H100 GPUs in total but parent quota `org` allows at most 2 H100 GPUs"
    )
    exact = Allocation(id="r", tenant="org/t", count=2, shape=Shape.of(1, "H100"))
    assert admissible(exact, quotas, ["H100"]) is None
    other = Allocation(id="r", tenant="org", count=8, shape=Shape.of(1, "L4"))
    assert admissible(other, quotas, ["L4"]) is None


def test_a_request_naming_no_model_is_refused_when_every_model_is_too_small() -> None:
    """Quota per GPU model, for a request naming no model: refused only when every model
    in the cluster is limited below it, saying the most any one model allows, even 0
    (kills the text's amounts and the guards)."""
    quotas = [Quota("t", limit=Resources(gpus_by_model={"H100": 2, "A100": 1}))]
    ask = Allocation(id="r", tenant="t", count=3, shape=Shape.of(1))
    assert admissible(ask, quotas, ["H100", "A100"]) == (
        "request needs 3 GPUs in total but tenant t allows at most 2 of any one GPU model"
    )
    assert admissible(ask, quotas, ["H100", "A100", "L4"]) is None  # L4 is not limited
    none = [Quota("t", limit=Resources(gpus_by_model={"H100": 0}))]
    assert admissible(ask, none, ["H100"]) == (
        "request needs 3 GPUs in total but tenant t allows at most 0 of any one GPU model"
    )
    # No GPU in the cluster at all: nothing to judge per model here (the placement's
    # "never fits" says why it cannot run).
    assert admissible(ask, [Quota("t")], []) is None


def test_a_parents_own_work_is_ranked_by_its_own_share_not_its_subtrees() -> None:
    """Hierarchical fair share: inside p (above its fair share of 4 of 8 GPUs: it holds
    6), p's own work (1 GPU, below its due 2) goes before its child p/c (5 GPUs, above
    its due 2), though p's subtree as a whole is above its share (kills the own work's
    score read as the whole subtree's)."""
    s = sim(8)
    running(s, "q", [0])
    s.submit("q", Shape.of(4), priority=-1)  # q's demand: p's entitlement stays at 4
    running(s, "p", [1])
    for i in range(5):
        running(s, "p/c", [2 + i])
    child = s.submit("p/c", Shape.of(1))
    own = s.submit("p", Shape.of(1))
    d = s.step()
    assert [a.allocation_id for a in d.admissions] == [own.id]
    assert d.preemptions == []
    assert child.id in d.pending


def test_recent_usage_counts_running_and_ended_work_up_the_tree() -> None:
    """Usage decays (Slurm's model): with a half-life of 100 s, 8 GPUs and 800 CPU
    millis running for 100 s count half, ended work counts as the history says, each in
    its own tenant's own usage and in every ancestor's; with no half-life nothing is
    recent (kills recent usage added to the wrong tables, tenants or amounts)."""
    a = placed("a1", "org/a", "n0", range(8), cpu=800)
    a.allocate_time = NOW - 100

    def ledger_with(half_life: float) -> Ledger:
        nodes = [make_node(f"n{i}", 8, cpu_millis=8000, memory_bytes=10_000) for i in range(2)]
        return Ledger(
            Snapshot(
                now=NOW,
                nodes={n.id: n for n in nodes},
                allocations={a.id: a},
                quotas={},
                config=SchedulerConfig(fair_share_half_life_seconds=half_life),
                ended_usage={"org/b": (2.0, 100.0, 0.0)},
            )
        )

    led = ledger_with(100.0)
    assert led.recent_of("org/a") == pytest.approx((4.0, 400.0, 0.0))
    assert led.recent_of("org/a", own=True) == pytest.approx((4.0, 400.0, 0.0))
    assert led.recent_of("org/b") == pytest.approx((2.0, 100.0, 0.0))
    assert led.recent_of("org") == pytest.approx((6.0, 500.0, 0.0))
    assert led.recent_of("org", own=True) == (0.0, 0.0, 0.0)
    off = ledger_with(0.0)
    assert off.recent_of("org") == (0.0, 0.0, 0.0)
    assert off.recent_of("org/b") == (0.0, 0.0, 0.0)


def test_a_parents_own_work_below_its_due_goes_before_a_child_at_its_due() -> None:
    """Hierarchical fair share, the quota rule for a parent's own work: p's own work
    holds 1 GPU of its due 2 (and most of the CPU, which it does not ask for), its child
    p/c holds its due 8; p's own request goes first, though its dominant share (the CPU)
    is above the child's (kills the own work's fair share not looked up)."""
    s = sim(10)
    running(s, "p", [0], cpu=30_000)
    for i in range(8):
        running(s, "p/c", [1 + i])
    child = s.submit("p/c", Shape.of(1))
    own = s.submit("p", Shape.of(1))
    d = s.step()
    assert [a.allocation_id for a in d.admissions] == [own.id]
    assert child.id in d.pending


def test_a_child_below_its_due_goes_before_its_parents_own_work_at_its_due() -> None:
    """The same rule the other way round: p's own work holds its due 8 GPUs, its child
    p/c 1 of its due 2 (and most of the CPU); the child's request goes first (kills the
    own work's due read as the whole subtree's, which it is below)."""
    s = sim(10)
    for i in range(8):
        running(s, "p", [i])
    running(s, "p/c", [8], cpu=30_000)
    own = s.submit("p", Shape.of(1))
    child = s.submit("p/c", Shape.of(1))
    d = s.step()
    assert [a.allocation_id for a in d.admissions] == [child.id]
    assert own.id in d.pending


def test_a_parents_own_work_and_child_both_below_their_due_go_by_arrival() -> None:
    """p's own work and its child each hold 1 GPU of a due of 1.5: both are below it,
    their shares tie, and the earlier request (p's own) goes first (kills the own
    work's score taken as nobody's, never below its due)."""
    s = sim(3)
    running(s, "p", [0])
    running(s, "p/c", [1])
    own = s.submit("p", Shape.of(1))
    child = s.submit("p/c", Shape.of(1))
    d = s.step()
    assert [a.allocation_id for a in d.admissions] == [own.id]
    assert child.id in d.pending


# ---------------------------------------------------------------------------------------
# Round 3. GetUsage: every number of a tenant and its subtree, and the order in words
# ("GetUsage shows the decayed usage and the score each tenant is ordered by, in words an
# operator can check"). Values below are worked out by hand on the 16-GPU cluster.


def _usage_case() -> Ledger:
    """org/a: guaranteed 2 GPUs (1 of them H100), 1 CPU, 1,000 bytes; limit 10 GPUs and
    12 CPUs; weight 2; lends 1 GPU. It holds 4 H100s, 2.5 CPUs, 500 bytes and asks 1
    GPU and 0.1 CPU more. org/b holds 2 GPUs; lab (weight 0) 8 CPUs; memhog 5,000 bytes."""
    quotas = [
        Quota(
            "org/a",
            guaranteed=Resources(
                gpus=2, cpu_millis=1000, memory_bytes=1000, gpus_by_model={"H100": 1}
            ),
            limit=Resources(gpus=10, cpu_millis=12000),
            weight=2.0,
            lending_limit=Resources(gpus=1),
        ),
        Quota("lab", weight=0.0),
    ]
    allocs = [
        placed("a1", "org/a", "n0", [0, 1, 2, 3], cpu=2500, mem=500),
        asking("a2", "org/a", gpus=1, cpu=100),
        placed("b1", "org/b", "n1", [0, 1]),
        placed("l1", "lab", "n1", [], cpu=8000),
        placed("m1", "memhog", "n0", [], mem=5000),
    ]
    return ledger(allocs, quotas)


def test_get_usage_reports_a_tenants_numbers_and_its_subtrees() -> None:
    """GetUsage (`_usage`): held, pending, guarantee, limit, borrowed (held above the
    guarantee, per resource and per model, never negative), dominant share (held over
    the cluster, in the largest resource) and over the weight, the fair share as a
    fraction and in resources, weight, counts, lending limit; a parent sums its
    subtree (kills `_usage` reading a wrong resource, guarantee or table, or
    miscounting borrowed)."""
    led = _usage_case()
    a = usage_from(led, "org/a")
    text_a = (
        "ordered among the children of org by (4 GPUs held - 2 GPUs guaranteed) / 16 GPUs"
        " in the cluster / weight 2 = 0.0625 (lower goes first)"
    )
    assert a == TenantUsage(
        tenant="org/a",
        held=Resources(gpus=4, cpu_millis=2500, memory_bytes=500, gpus_by_model={"H100": 4}),
        pending=Resources(gpus=1, cpu_millis=100, memory_bytes=0),
        guaranteed=Resources(gpus=2, cpu_millis=1000, memory_bytes=1000, gpus_by_model={"H100": 1}),
        limit=Resources(gpus=10, cpu_millis=12000),
        # 4 - 2 GPUs, 2.5 - 1 CPUs, memory under its guarantee: 0; H100s 4 - 1.
        borrowed=Resources(gpus=2, cpu_millis=1500, memory_bytes=0, gpus_by_model={"H100": 3}),
        dominant_share=0.25,  # 4 of 16 GPUs
        weighted_dominant_share=0.125,
        fair_share=5 / 16,  # its whole demand fits: 5 GPUs of 16
        fair_share_resources=Resources(gpus=5, cpu_millis=2600, memory_bytes=500),
        weight=2.0,
        running=1,
        pending_count=1,
        recent=Resources(gpus=0, cpu_millis=0, memory_bytes=0),
        order_score=0.0625,  # (4 - 2) / 16 / 2
        order_text=text_a,
        lending_limit=Resources(gpus=1),
    )
    org = usage_from(led, "org")
    assert (org.held, org.pending, org.borrowed) == (
        Resources(gpus=6, cpu_millis=2500, memory_bytes=500, gpus_by_model={"H100": 6}),
        Resources(gpus=1, cpu_millis=100, memory_bytes=0),
        Resources(gpus=6, cpu_millis=2500, memory_bytes=500),  # no guarantee of its own
    )
    assert (org.running, org.pending_count, org.dominant_share, org.fair_share) == (
        2,
        1,
        6 / 16,
        7 / 16,
    )
    assert org.fair_share_resources == Resources(gpus=7, cpu_millis=2600, memory_bytes=500)
    lab = usage_from(led, "lab")  # weight 0: its share over the weight is infinite
    assert (lab.dominant_share, lab.weighted_dominant_share, lab.weight) == (0.5, math.inf, 0)
    assert lab.fair_share == 0.5 and lab.fair_share_resources.cpu_millis == 8000
    # A tenant not heard of yet is placed in the tree first: among its parent's children.
    assert usage_from(led, "org/new").order_text.startswith("ordered among the children of org ")
    nobody = usage_from(led, "nobody")  # unknown: uses nothing, default weight
    assert nobody == TenantUsage(
        tenant="nobody",
        held=Resources(gpus=0, cpu_millis=0, memory_bytes=0),
        pending=Resources(gpus=0, cpu_millis=0, memory_bytes=0),
        borrowed=Resources(gpus=0, cpu_millis=0, memory_bytes=0),
        fair_share_resources=Resources(gpus=0, cpu_millis=0, memory_bytes=0),
        recent=Resources(gpus=0, cpu_millis=0, memory_bytes=0),
        order_text="ordered among the top-level tenants by nothing used or guaranteed = 0"
        " (lower goes first)",
    )


@pytest.mark.parametrize(
    ("tenant", "text"),
    [
        # The resource it uses most of the cluster's, above its guarantee: GPUs here,
        # though it holds 2.5 CPUs ((2.5 - 1) / 16 = 0.094 < 0.125).
        (
            "org/a",
            "ordered among the children of org by (4 GPUs held - 2 GPUs guaranteed) / 16"
            " GPUs in the cluster / weight 2 = 0.0625 (lower goes first)",
        ),
        (
            "org",
            "ordered among the top-level tenants by 6 GPUs held / 16 GPUs in the cluster /"
            " weight 1 = 0.375 (lower goes first)",
        ),
        (
            "lab",
            "ordered among the top-level tenants by 8 CPU held / 16 CPU in the cluster ="
            " 0.5, after every weighted sibling (weight 0)",
        ),
        (
            "memhog",
            "ordered among the top-level tenants by 0.00477 MiB memory held / 0.0191 MiB"
            " memory in the cluster / weight 1 = 0.25 (lower goes first)",
        ),
    ],
)
def test_the_order_score_in_words_names_the_resource_it_is_taken_from(
    tenant: str, text: str
) -> None:
    """GetUsage's `order_text`: the level it is ordered in, the resource, amount held,
    guarantee subtracted, cluster total, weight (or the weight-0 tier) and the score
    (kills `order_text` picking another resource, dropping the guarantee, the parent or
    the weight, or misplacing the weight-0 tier)."""
    led = _usage_case()
    assert order_text(led, tenant) == text
    assert usage_from(led, tenant).order_text == text


def test_the_order_score_in_words_says_when_it_is_recent_usage() -> None:
    """Decayed usage in GetUsage: a tenant whose work ended is ordered by its recent
    usage, and says so; the usage shows it, rounded, with the half-life; a guarantee
    it does not use still names its resource (kills `order_text` calling recent usage
    "held", `_usage` reading recent usage or the half-life wrongly)."""
    nodes = [make_node(f"n{i}", 8, cpu_millis=8000, memory_bytes=10_000) for i in range(2)]
    snap = Snapshot(
        now=NOW,
        nodes={n.id: n for n in nodes},
        allocations={},
        quotas={"g": Quota("g", guaranteed=Resources(cpu_millis=4000))},
        config=SchedulerConfig(fair_share_half_life_seconds=600.0),
        ended_usage={"old": (3.4, 1200.6, 0.0)},
    )
    led = Ledger(snap)
    old = usage_from(led, "old")
    assert old.recent == Resources(gpus=3, cpu_millis=1201, memory_bytes=0)
    assert old.half_life_seconds == 600.0
    assert old.order_text == (
        "ordered among the top-level tenants by 3.4 GPUs of recent usage / 16 GPUs in the"
        " cluster / weight 1 = 0.2125 (lower goes first)"
    )
    # g uses nothing but is guaranteed CPU: ordered by (0 - 4 CPUs) / 16 CPUs.
    assert usage_from(led, "g").order_text == (
        "ordered among the top-level tenants by (0 CPU held - 4 CPU guaranteed) / 16 CPU in"
        " the cluster / weight 1 = -0.25 (lower goes first)"
    )


def test_get_usage_of_a_per_model_guarantee_the_tenant_holds_none_of() -> None:
    """GetUsage answers for a tenant guaranteed a GPU model it holds none of (an idle
    per-model guarantee): it borrows none of it (kills `_usage` reading a model it does
    not hold as None: a crash)."""
    quotas = [Quota("t", guaranteed=Resources(gpus=2, gpus_by_model={"A100": 2}))]
    u = usage_from(ledger([placed("h", "t", "n0", [0, 1, 2])], quotas), "t")
    assert u.borrowed == Resources(gpus=1, cpu_millis=0, memory_bytes=0, gpus_by_model={})
    assert u.held.gpus_by_model == {"H100": 3}


@pytest.mark.parametrize(
    ("nodes", "fair_share"),
    [
        ([], 0.0),  # no node yet: nothing to share
        ([make_node("c", 0, cpu_millis=4000, memory_bytes=1000)], 1.0),  # no GPU at all
        ([make_node("one", 1, cpu_millis=64_000, memory_bytes=10**6)], 1.0),  # one GPU
    ],
)
def test_get_usage_on_clusters_with_no_nodes_no_gpus_or_one_gpu(
    nodes: list[Node], fair_share: float
) -> None:
    """GetUsage answers on any cluster: the fair share as a fraction is taken over the
    resources the cluster has (one unit counts; none is skipped, never divided by),
    and is 0 when it has nothing (kills `_usage`'s fraction without a default, with
    a default of None or 1, over resources of capacity 0, or skipping a capacity of 1)."""
    running = []
    if nodes and nodes[0].gpus:
        running.append(placed("g", "t", nodes[0].id, [0], cpu=1000))
    elif nodes:
        running.append(placed("c", "t", nodes[0].id, [], cpu=4000))
    snap = Snapshot(
        now=NOW,
        nodes={n.id: n for n in nodes},
        allocations={a.id: a for a in running},
        quotas={},
        config=SchedulerConfig(),
    )
    assert usage_from(Ledger(snap), "t").fair_share == fair_share


@pytest.mark.parametrize(
    ("allocs", "quotas", "text"),
    [
        # GPUs 2/16 = 0.125 beat CPU 1.9/16 = 0.119: no unit is taken off either.
        (
            [placed("x", "t", "n0", [0, 1], cpu=1900)],
            [],
            "by 2 GPUs held / 16 GPUs in the cluster / weight 1 = 0.125",
        ),
        # CPU 2.001/16 beats GPUs 2/16 by one milli.
        (
            [placed("x", "t", "n0", [0, 1], cpu=2001)],
            [],
            "by 2001m CPU held / 16 CPU in the cluster / weight 1 = 0.1251",
        ),
        # CPU 8/16 beats GPUs 1/16, the first resource looked at.
        (
            [placed("x", "t", "n0", [0], cpu=8000)],
            [],
            "by 8 CPU held / 16 CPU in the cluster / weight 1 = 0.5",
        ),
        # GPUs above the guarantee (3 - 2)/16 lose to CPU 4/16.
        (
            [placed("x", "t", "n0", [0, 1, 2], cpu=4000)],
            [Quota("t", guaranteed=Resources(gpus=2))],
            "by 4 CPU held / 16 CPU in the cluster / weight 1 = 0.25",
        ),
    ],
)
def test_the_order_score_in_words_names_the_largest_share_above_the_guarantee(
    allocs: list[Allocation], quotas: list[Quota], text: str
) -> None:
    """GetUsage's `order_text` spells out the score the queue orders by: the resource
    whose share of the cluster, above the guarantee, is the largest (kills `order_text`
    comparing shares with a unit taken off, the guarantee added, or times the total)."""
    led = ledger(allocs, quotas)
    assert order_text(led, "t") == f"ordered among the top-level tenants {text} (lower goes first)"
    assert led.order_score("t")[1] == pytest.approx(float(text.rsplit("= ", 1)[1]), rel=1e-3)


def test_the_order_score_in_words_on_one_gpu_or_none() -> None:
    """`order_text` on any cluster: one GPU in all counts (holding it is a share of 1);
    a cluster without GPUs skips them, a GPU guarantee included, never dividing by 0
    (kills `order_text` skipping a capacity or a use of exactly 1, or judging a
    resource the cluster has none of: a crash)."""
    one = make_node("one", 1, cpu_millis=64_000, memory_bytes=10**6)
    cpu_only = make_node("c", 0, cpu_millis=4000, memory_bytes=1000)
    cases = [
        (one, placed("g", "t", "one", [0], cpu=1000), {}),
        (
            cpu_only,
            placed("c", "t", "c", [], cpu=1000),
            {"t": Quota("t", guaranteed=Resources(gpus=2))},
        ),
    ]
    texts = []
    for node, alloc, quotas in cases:
        snap = Snapshot(
            now=NOW,
            nodes={node.id: node},
            allocations={alloc.id: alloc},
            quotas=quotas,
            config=SchedulerConfig(),
        )
        texts.append(order_text(Ledger(snap), "t"))
    assert texts[0].startswith("ordered among the top-level tenants by 1 GPU")
    assert texts[0].endswith("held / 1 GPU in the cluster / weight 1 = 1 (lower goes first)")
    assert texts[1] == (
        "ordered among the top-level tenants by 1 CPU held / 4 CPU in the cluster / weight 1"
        " = 0.25 (lower goes first)"
    )


# ---------------------------------------------------------------------------------------
# Round 3: every limit a request breaks, and the GPU models per-model limits allow.


def _limits_case() -> Ledger:
    """org: limit 6 GPUs. org/a: limit 4 GPUs, 3 CPUs, 0 bytes, 3 H100s; holds 2 H100s,
    1 CPU and 100 bytes (over its memory limit, as after a limit was lowered). org/b (no
    quota of its own) holds 3 GPUs."""
    quotas = [
        Quota("org", limit=Resources(gpus=6)),
        Quota(
            "org/a",
            limit=Resources(gpus=4, cpu_millis=3000, memory_bytes=0, gpus_by_model={"H100": 3}),
        ),
    ]
    allocs = [
        placed("a1", "org/a", "n0", [0, 1], cpu=1000, mem=100),
        placed("b1", "org/b", "n1", [0, 1, 2]),
    ]
    return ledger(allocs, quotas)


def test_every_limit_a_request_breaks_is_named_nearest_first() -> None:
    """Quota: a request is refused by every limit on its chain it would break — per
    resource it asks for, per GPU model, its own before its parent's — each with what
    the subtree holds, the limit and the ask; what its victims give back counts (kills
    `limit_breaches` skipping a level, a resource or a model, reading the wrong amount,
    judging a resource not asked for, or ignoring what is freed)."""
    led = _limits_case()
    ask = Amount(3, 2500, 0, {"H100": 3})
    assert list(led.limit_breaches("org/a", ask)) == [
        QuotaBlock("org/a", "org/a", "gpus", "", 2, 4, 3),
        QuotaBlock("org/a", "org/a", "cpu", "", 1000, 3000, 2500),
        QuotaBlock("org/a", "org/a", "gpus", "H100", 2, 3, 3),
        QuotaBlock("org", "org/a", "gpus", "", 5, 6, 3),
    ]
    # One H100 of org/a and two GPUs of org/b given back: only the model limit binds
    # (1 + 3 > 3); org holds 5 - 3 = 2 (2 + 3 <= 6).
    freed = {
        "org/a": Amount(1, 0, 0, {"H100": 1}),
        "org": Amount(3, 0, 0, {"H100": 3}),
    }
    assert list(led.limit_breaches("org/a", Amount(3, 0, 0, {"H100": 3}), freed)) == [
        QuotaBlock("org/a", "org/a", "gpus", "H100", 1, 3, 3),
    ]
    # Exactly at each limit is within it; memory, over its limit but not asked for,
    # binds nothing.
    assert list(led.limit_breaches("org/a", Amount(1, 2000, 0, {"H100": 1}))) == []
    assert led.limit_block("org/b", Amount(1)) is None
    assert led.limit_block("org/b", Amount(2)) == QuotaBlock("org", "org/b", "gpus", "", 5, 6, 2)


def test_a_request_naming_no_model_may_use_the_models_its_limits_allow() -> None:
    """Quota per GPU model: a request naming no model may be placed only on models every
    per-model limit on its chain still allows for its GPUs; with no per-model limit on
    the chain, or no GPUs asked, every model is allowed (None) (kills `allowed_models`
    misreading the chain, the held amount or the ask)."""
    led = _limits_case()
    models = ("A100", "H100")
    assert led.allowed_models("org/a", 1, models) == ("A100", "H100")  # 2 + 1 <= 3
    assert led.allowed_models("org/a", 2, models) == ("A100",)  # 2 + 2 > 3
    assert led.allowed_models("org/a", 0, models) is None
    assert led.allowed_models("org/b", 4, models) is None  # no per-model limit above it
    quotas = [
        Quota("org", limit=Resources(gpus_by_model={"A100": 0})),
        Quota("org/a", limit=Resources(gpus_by_model={"H100": 3})),
    ]
    led = ledger([placed("a1", "org/a", "n0", [0, 1])], quotas)
    # The parent's limit forbids A100s to the whole subtree; org/a's own allows 1 H100.
    assert led.allowed_models("org/a", 1, models) == ("H100",)
    assert led.allowed_models("org/a", 2, models) == ()
    assert led.allowed_models("org/b", 1, models) == ("H100",)
    # A model limited but not held: up to its limit is allowed.
    led = ledger([], [Quota("t", limit=Resources(gpus_by_model={"A100": 2}))])
    assert led.allowed_models("t", 2, models) == ("A100", "H100")
    assert led.allowed_models("t", 3, models) == ("H100",)


def test_a_half_life_of_one_second_still_counts_recent_usage() -> None:
    """Decayed usage: any positive `fair_share_half_life_seconds` (config accepts >= 0)
    weighs recent usage; only 0 turns it off (kills `Ledger.__init__` turning decay off
    for a half-life of 1 s or less)."""
    nodes = [make_node("n0", 8, cpu_millis=8000, memory_bytes=10_000)]
    for half_life, want in ((1.0, (2.0, 0.0, 0.0)), (0.0, (0.0, 0.0, 0.0))):
        snap = Snapshot(
            now=NOW,
            nodes={n.id: n for n in nodes},
            allocations={},
            quotas={},
            config=SchedulerConfig(fair_share_half_life_seconds=half_life),
            ended_usage={"old": (2.0, 0.0, 0.0)},
        )
        assert Ledger(snap).recent_of("old") == want, half_life


# ---------------------------------------------------------------------------------------
# Round 3: usage changes within a pass (a victim gone at once, or leaving in its grace).


def test_a_victim_gone_at_once_is_counted_as_if_it_never_ran() -> None:
    """With no preemption grace a victim leaves within the pass (`add_held(..., -1)`):
    from then on the ledger must count, order and bound every tenant as one built
    without that victim — the total held (lending limits read it), the parent's own
    work and its remembered scores included (kills `add_held` ignoring the sign in the
    total or the own work, or keeping a stale score or effective amount)."""
    allocs = [
        placed("own1", "org", "n0", [0, 1], cpu=1000),
        placed("a1", "org/a", "n1", [0]),
    ]
    victim = placed("own2", "org", "n0", [2, 3, 4], cpu=500, mem=100)
    quotas = [Quota("org", guaranteed=Resources(gpus=6))]
    full, base = ledger([*allocs, victim], quotas), ledger(allocs, quotas)
    before = (full.order_score("org", own=True), full.order_score("org"))  # remembered
    assert before != (base.order_score("org", own=True), base.order_score("org"))
    assert not full.within_guarantee("org", Amount(1))  # 6 held of 6 (remembered)
    full.add_held("org", full.placed["own2"], -1)
    assert full.within_guarantee("org", Amount(1))  # 3 held + 1 <= 6
    assert full.held_total.vector() == base.held_total.vector() == (3, 1000, 0)
    assert full.own_held["org"].vector() == base.own_held["org"].vector()
    assert full.order_score("org", own=True) == base.order_score("org", own=True)
    assert full.order_score("org") == base.order_score("org")
    assert full.order_key("org/a") == base.order_key("org/a")


def test_a_victim_in_its_grace_counts_as_leaving_until_it_is_gone() -> None:
    """A victim preempted with a grace period still holds its capacity but is leaving
    (`add_leaving`): its tenant's effective usage and order drop at once; taking the
    leaving back (the engine's undo, sign -1) restores them (kills `add_leaving`
    ignoring the sign, or keeping a stale score, held vector or effective amount)."""
    quotas = [Quota("org/a", guaranteed=Resources(gpus=2))]
    allocs = [placed("a1", "org/a", "n1", [0])]
    victim = placed("a2", "org/a", "n0", [0, 1, 2], cpu=500)
    full, base = ledger([*allocs, victim], quotas), ledger(allocs, quotas)
    was = [full.order_score(t) for t in ("org", "org/a")]
    # 4 GPUs held against a guarantee of 2: one more is not within it (remembered).
    assert not full.within_guarantee("org/a", Amount(1))
    amt = full.placed["a2"]
    full.add_leaving("org/a", amt)
    for t in ("org", "org/a"):
        assert full.effective(t).vector() == base.effective(t).vector(), t
        assert full.order_score(t) == base.order_score(t), t
        assert full.held_of(t).vector() == (4, 500, 0), t  # still held in its grace
    assert full.within_guarantee("org/a", Amount(1))  # 1 left + 1 <= 2
    full.add_leaving("org/a", amt, -1)
    assert [full.order_score(t) for t in ("org", "org/a")] == was
    assert full.effective("org").vector() == (4, 500, 0)
    assert not full.within_guarantee("org/a", Amount(1))
