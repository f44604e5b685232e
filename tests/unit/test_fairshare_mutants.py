"""Fair-share promises that mutation testing (`make mutate`) showed no test kept.

Each test states a README/SPEC promise (Fair share, Quota) on a small case and names the
mutants of `scheduler/fairshare.py` it kills. Survivors judged harmless (equivalent: the
behaviour cannot change, or only by less than `EPS`) are listed in `tests/unit/MUTANTS.md`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from rmgrpc.model import Allocation, AllocationState, Placement, Quota, Resources, Shape
from rmgrpc.scheduler.fairshare import Amount, Ledger, water_fill
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
