"""Preemption promises that mutation testing (`make mutate`) showed no test kept.

Each test states a README/SPEC promise (Quota, Preemption) on a small cluster; the
mutants of `scheduler/preemption.py` each one kills are named in its docstring. Victims
sit on A100 nodes while the request asks for H100 GPUs where it is so: then no victim
frees capacity the request could use, and only the *quota* search (victims anywhere in
the subtree whose limit binds) can find them. Survivors judged harmless, the scores and
one bug found are in `tests/unit/MUTANTS.md`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rmgrpc.model import (
    Allocation,
    AllocationState,
    BorrowingPreemption,
    Placement,
    Quota,
    ReclaimPolicy,
    Resources,
    Shape,
    WithinTenantPreemption,
)
from rmgrpc.scheduler.simulate import Simulator, make_node
from rmgrpc.scheduler.snapshot import Decisions, SchedulerConfig

NO_WAIT = SchedulerConfig(
    min_runtime_seconds=0, preemption_grace_seconds=0, max_preemptions_per_cycle=64
)


def cluster(
    nodes: Sequence[tuple[str, int, str]],
    quotas: Sequence[Quota] = (),
    config: SchedulerConfig = NO_WAIT,
) -> Simulator:
    """Nodes given as (id, GPUs, GPU model)."""
    return Simulator([make_node(n, g, m) for n, g, m in nodes], quotas, config)


def run(
    s: Simulator,
    tenant: str,
    node: str,
    gpus: Sequence[int],
    *,
    priority: int = 0,
    aid: str,
    age: float = 1000.0,
    cpu: int = 0,
) -> Allocation:
    """A running single-replica allocation on `node`, started `age` s ago."""
    a = s.submit(tenant, Shape.of(len(gpus), cpu_millis=cpu), priority=priority, alloc_id=aid)
    a.state = AllocationState.ALLOCATED
    a.placements = (Placement(node, tuple(gpus)),)
    a.allocate_time = s.now - age
    return a


def victims(d: Decisions) -> set[str]:
    return {p.allocation_id for p in d.preemptions}


def admitted(d: Decisions) -> list[str]:
    return [a.allocation_id for a in d.admissions]


def h100(gpus: int) -> Shape:
    return Shape.of(gpus, "H100")


def test_a_limit_freed_by_two_allocations_of_the_tenant() -> None:
    """Quota: a higher-priority request of a tenant at its limit preempts the two
    lower-priority allocations whose quota it needs together (kills `_quota_ok`
    counting only the last victim of a tenant)."""
    s = cluster([("n1", 8, "H100"), ("n2", 8, "A100")], [Quota("t", limit=Resources(gpus=4))])
    run(s, "t", "n2", [0, 1], priority=-1, aid="v1")
    run(s, "t", "n2", [2, 3], priority=-1, aid="v2")
    req = s.submit("t", h100(4), priority=1)
    d = s.step()
    assert victims(d) == {"v1", "v2"}
    assert admitted(d) == [req.id]


def test_quota_is_freed_under_the_topmost_limit_that_binds() -> None:
    """Quota, "nor a parent its own": the request binds its own limit, its parent's and
    its grandparent's; freeing the grandparent's takes a cousin's allocation (kills the
    climb to the topmost binding limit stopping early in `_quota_candidates`)."""
    quotas = [
        Quota("org/a/x", limit=Resources(gpus=2)),
        Quota("org/a", limit=Resources(gpus=4)),
        Quota("org", limit=Resources(gpus=5)),
    ]
    s = cluster([("n1", 8, "H100"), ("n2", 8, "A100")], quotas)
    run(s, "org/a/x", "n2", [0], priority=-1, aid="vx")
    run(s, "org/a/y", "n2", [1, 2], priority=5, aid="vy")  # higher priority: not a victim
    run(s, "org/b", "n2", [3, 4], priority=-1, aid="vb")
    req = s.submit("org/a/x", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"vx", "vb"}
    assert admitted(d) == [req.id]
    assert s.held_gpus("org") <= 5 and s.held_gpus("org/a") <= 4


def test_a_quota_victim_is_found_among_many_lower_priority_siblings() -> None:
    """Quota: only the tenant's own allocation frees its limit; thirteen lower-priority
    allocations of a sibling, first in victim order, must not crowd it out of the
    bounded candidate list (kills `_quota_candidates` widening to the whole tree)."""
    s = cluster(
        [("n1", 8, "H100"), ("n2", 8, "A100"), ("n3", 8, "A100")],
        [Quota("org/a", limit=Resources(gpus=1))],
    )
    run(s, "org/a", "n2", [0], priority=0, aid="mine")
    for i in range(13):
        node, gpu = ("n2", i + 1) if i < 7 else ("n3", i - 7)
        run(s, "org/b", node, [gpu], priority=-1, aid=f"sib{i:02d}")
    req = s.submit("org/a", h100(1), priority=1)
    d = s.step()
    assert victims(d) == {"mine"}
    assert admitted(d) == [req.id]


def test_fewest_victims_among_more_than_twelve_quota_candidates() -> None:
    """Preemption, "the fewest victims": twelve 1-GPU allocations come first in victim
    order, yet one 4-GPU allocation frees the quota alone (kills `_quota_candidates`
    keeping the smallest, or none, beyond the first twelve)."""
    s = cluster(
        [("n1", 8, "H100"), ("n2", 8, "A100"), ("n3", 8, "A100")],
        [Quota("t", limit=Resources(gpus=16))],
    )
    for i in range(12):
        node, gpu = ("n2", i) if i < 8 else ("n3", i - 8)
        run(s, "t", node, [gpu], priority=-1, aid=f"small{i:02d}")
    run(s, "t", "n3", [4, 5, 6, 7], priority=0, aid="big")
    req = s.submit("t", h100(4), priority=1)
    d = s.step()
    assert victims(d) == {"big"}
    assert admitted(d) == [req.id]


def test_a_cpu_guarantee_protects_the_other_tenant() -> None:
    """Preemption by priority takes another tenant's work only while that tenant stays
    at or above its guarantee, in every resource: a CPU guarantee counts as a GPU one
    (kills `_tenants_ok` skipping CPU when no GPU is freed, or miscounting CPU)."""
    quotas = [Quota("v", guaranteed=Resources(cpu_millis=4000))]
    cpu_only = Shape.of(0, cpu_millis=4000)
    # v holds 8 CPU, guaranteed 4: one allocation may go (v stays at 4), not both.
    s = cluster([("n1", 0, "H100")], quotas)
    s.nodes["n1"].cpu_millis = 8000
    for aid, age in (("v1", 1000.0), ("v2", 900.0)):
        a = s.submit("v", cpu_only, priority=-1, alloc_id=aid)
        a.state = AllocationState.ALLOCATED
        a.placements = (Placement("n1", ()),)
        a.allocate_time = s.now - age
    one = s.submit("r", cpu_only, priority=1)
    d = s.step()
    assert len(victims(d)) == 1
    assert admitted(d) == [one.id]
    two = s.submit("r", Shape.of(0, cpu_millis=4000), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert two.id in d.pending


def test_memory_freed_by_a_victim_lets_the_request_fit() -> None:
    """Preemption frees what the request lacks, memory included: a free GPU is not
    enough when a lower-priority allocation holds the node's memory (kills victims
    counting the memory they free wrongly)."""
    gib = 1024**3
    s = cluster([("n1", 2, "H100")])
    a = s.submit("low", Shape.of(1, memory_bytes=512 * gib), priority=-1, alloc_id="low")
    a.state = AllocationState.ALLOCATED
    a.placements = (Placement("n1", (0,)),)
    a.allocate_time = s.now - 1000
    req = s.submit("high", Shape.of(1, memory_bytes=64 * gib), priority=1)
    d = s.step()
    assert victims(d) == {"low"}
    assert admitted(d) == [req.id]


def test_own_work_does_not_hide_another_tenants_guarantee() -> None:
    """Preemption by priority takes the requester's own lower-priority work freely, but
    never another tenant's below its guarantee, even in the same victim set (kills
    `_tenants_ok` stopping at the requester's own victim)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=1))]
    s = cluster([("n1", 2, "H100")], quotas)
    run(s, "r", "n1", [0], priority=-1, aid="own", age=10)
    run(s, "g", "n1", [1], priority=-1, aid="guaranteed", age=5000)
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_reclaim_policy_never_keeps_other_tenants_work() -> None:
    """Per-tenant policy "reclaiming from other tenants: never": a tenant under its
    guarantee waits rather than preempt a borrower (kills the NEVER rule)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=2), reclaim_from_others=ReclaimPolicy.NEVER)]
    s = cluster([("n1", 2, "H100")], quotas)
    run(s, "b", "n1", [0, 1], priority=-1, aid="borrowed")
    req = s.submit("g", h100(2), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_reclaim_policy_lower_priority_takes_the_next_lower_priority() -> None:
    """Per-tenant policy "reclaiming: lower priority": a borrower one priority below the
    requester is reclaimed, one at its priority is not (kills the priority cut-off)."""
    quotas = [
        Quota("g", guaranteed=Resources(gpus=2), reclaim_from_others=ReclaimPolicy.LOWER_PRIORITY)
    ]
    for prio, taken in ((1, True), (2, False)):
        s = cluster([("n1", 2, "H100")], quotas)
        run(s, "b", "n1", [0, 1], priority=prio, aid="borrowed")
        req = s.submit("g", h100(2), priority=2)
        d = s.step()
        assert victims(d) == ({"borrowed"} if taken else set()), prio
        assert (admitted(d) == [req.id]) is taken
        if taken:  # reclaimed as a guarantee, not merely preempted by priority
            assert "reclaims its guaranteed quota from borrower b" in d.preemptions[0].reason


def test_borrowing_preemptor_takes_up_to_its_priority_threshold() -> None:
    """Per-tenant policy "preempt while borrowing, up to a priority": other tenants'
    work up to `borrowing_max_priority` may go, above it not (kills the threshold being
    dropped or ignored)."""
    quotas = [
        Quota(
            "r",
            preemption_while_borrowing=BorrowingPreemption.UP_TO_PRIORITY,
            borrowing_max_priority=1,
        )
    ]
    for prio, taken in ((1, True), (2, False)):
        s = cluster([("n1", 2, "H100")], quotas)
        run(s, "y", "n1", [0, 1], priority=prio, aid="other")
        req = s.submit("r", h100(2), priority=5)
        d = s.step()
        assert victims(d) == ({"other"} if taken else set()), prio
        assert (admitted(d) == [req.id]) is taken


def test_one_request_never_exceeds_the_preemption_cap() -> None:
    """Preemption limits: "a cap bounds preemptions per cycle": a request that needs two
    victims under a cap of one preempts nobody and says so (kills the cap check)."""
    config = SchedulerConfig(
        min_runtime_seconds=0, preemption_grace_seconds=0, max_preemptions_per_cycle=1
    )
    s = cluster([("n1", 2, "H100")], config=config)
    run(s, "y", "n1", [0], priority=-1, aid="v1")
    run(s, "y", "n1", [1], priority=-1, aid="v2")
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_reclaim_takes_borrowed_work_not_the_parents_own() -> None:
    """Preemption, "a guarantee is always reachable" by reclaiming what *others* borrow:
    the parent's own allocation (newest and lowest priority, so the cheapest victim
    otherwise) is not borrowed from the child; another tenant's borrowed one goes."""
    quotas = [Quota("org/a", guaranteed=Resources(gpus=2)), Quota("x")]
    s = cluster([("n1", 4, "H100")], quotas)
    run(s, "org", "n1", [0, 1], priority=-1, aid="parent_own", age=100)
    run(s, "x", "n1", [2, 3], priority=3, aid="borrowed", age=5000)
    req = s.submit("org/a", h100(2), priority=0)
    d = s.step()
    assert victims(d) == {"borrowed"}
    assert "reclaims its guaranteed quota from borrower x" in d.preemptions[0].reason
    assert admitted(d) == [req.id]


def test_no_borrowing_policy_still_preempts_its_own_subtree() -> None:
    """Per-tenant policy "may a borrowing preemptor preempt other tenants": NEVER keeps
    other tenants' work, not the preemptor's own subtree's (kills `_inside_own_tree`)."""
    quotas = [
        Quota("org", preemption_while_borrowing=BorrowingPreemption.NEVER),
    ]
    s = cluster([("n1", 2, "H100")], quotas)
    run(s, "org/k", "n1", [0, 1], priority=-1, aid="child")
    req = s.submit("org", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"child"}
    assert admitted(d) == [req.id]
    # Another tenant's work at the same place is kept by that policy.
    s2 = cluster([("n1", 2, "H100")], quotas)
    run(s2, "y", "n1", [0, 1], priority=-1, aid="other")
    req2 = s2.submit("org", h100(2), priority=1)
    d2 = s2.step()
    assert victims(d2) == set()
    assert req2.id in d2.pending


def test_reclaim_reason_names_exactly_the_borrowers() -> None:
    """Explain: a tenant under its guarantee that cannot reclaim yet says from whom it
    waits to reclaim: tenants holding GPUs above their own guarantee, never its own
    ancestors, nor tenants within their guarantee, nor those holding no GPUs of their
    own (kills the filters of `borrowers`)."""
    quotas = [
        Quota("org/a", guaranteed=Resources(gpus=4)),
        Quota("c", guaranteed=Resources(gpus=4)),
    ]
    config = SchedulerConfig(min_runtime_seconds=3600, preemption_grace_seconds=0)
    s = cluster([("n1", 8, "H100"), ("n2", 4, "H100")], quotas, config)
    run(s, "org", "n1", [0, 1], aid="parent_own", age=10)  # the requester's ancestor
    run(s, "b", "n1", [2, 3, 4], aid="b1", age=10)  # borrows 3
    run(s, "c", "n1", [5, 6], aid="c1", age=10)  # within its guarantee of 4
    run(s, "d", "n1", [7], aid="d1", age=10)  # borrows 1
    run(s, "p/k", "n2", [0, 1, 2], aid="pk", age=10)  # p borrows 3 through its child
    run(s, "org/a/z", "n2", [3], aid="z1", age=10)  # the requester's own child
    s.submit("p", Shape.of(0, cpu_millis=100))  # p holds no GPU of its own
    s.step()  # p's CPU-only request runs
    req = s.submit("org/a", h100(2))
    d = s.step()
    reason = d.pending[req.id].reason
    assert "tenant org/a is under its guarantee (holds 1 of 4 GPUs)" in reason
    assert "waiting to reclaim from borrowers b (3 GPUs), d (1 GPU), p/k (3 GPUs):" in reason


def test_quota_victims_stay_inside_the_binding_parent_among_many_cousins() -> None:
    """Quota: the request binds its own limit and its parent's (not the root's); victims
    come from the parent's subtree, and thirteen lower-priority allocations of a cousin
    outside it do not crowd them out (kills `_quota_candidates` losing the climbed-to
    tenant and falling back to the whole tree)."""
    quotas = [Quota("org/a/x", limit=Resources(gpus=1)), Quota("org/a", limit=Resources(gpus=2))]
    s = cluster([("n1", 8, "H100"), ("n2", 8, "A100"), ("n3", 8, "A100")], quotas)
    run(s, "org/a/x", "n2", [0], priority=0, aid="mine")
    run(s, "org/a/y", "n2", [1], priority=5, aid="sibling")  # higher priority: stays
    for i in range(13):
        node, gpu = ("n2", i + 2) if i < 6 else ("n3", i - 6)
        run(s, "org/b", node, [gpu], priority=-1, aid=f"cousin{i:02d}")
    req = s.submit("org/a/x", h100(1), priority=1)
    d = s.step()
    assert victims(d) == {"mine"}
    assert admitted(d) == [req.id]


def test_two_requests_of_a_tenant_never_take_the_same_victim() -> None:
    """Preemption: no GPU is ever held by two live allocations: two requests of one
    tenant preempting its own lower-priority work in one cycle take a victim each
    (kills an own victim already taken this cycle offered again)."""
    s = cluster([("n1", 4, "H100")])
    run(s, "t", "n1", [0, 1], priority=-1, aid="old", age=2000)
    run(s, "t", "n1", [2, 3], priority=-1, aid="new", age=1000)
    first = s.submit("t", h100(2), priority=1)
    second = s.submit("t", h100(2), priority=1)
    d = s.step()
    assert [p.allocation_id for p in d.preemptions] == ["new", "old"]
    assert admitted(d) == [first.id, second.id]
    gpus = [(p.node_id, g) for a in d.admissions for p in a.placements for g in p.gpu_indices]
    assert len(gpus) == len(set(gpus)) == 4


def test_priority_preemption_never_takes_another_tenants_equal_priority() -> None:
    """Preemption by priority takes only *strictly* lower priority from other tenants
    (issue 9, "gaps the suite does not see"; kills `>=` loosened to `>`)."""
    s = cluster([("n1", 2, "H100"), ("n2", 1, "A100")])
    run(s, "y", "n1", [0, 1], priority=1, aid="equal")
    run(s, "z", "n2", [0], priority=0, aid="lower_elsewhere")  # makes priority mode apply
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_own_victim_first_in_the_set_does_not_hide_a_guarantee() -> None:
    """Preemption by priority: another tenant keeps its guarantee across the whole
    victim set, even when the requester's own victim comes first in it: each of g's
    two allocations may go alone, not both (kills `_tenants_ok` stopping at the own
    victim)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=1))]
    s = cluster([("n1", 3, "H100")], quotas)
    run(s, "r", "n1", [0], priority=-2, aid="own")
    run(s, "g", "n1", [1], priority=-1, aid="g1")
    run(s, "g", "n1", [2], priority=-1, aid="g2")
    req = s.submit("r", h100(3), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_a_memory_guarantee_lets_exactly_the_excess_go() -> None:
    """Preemption by priority takes another tenant's work while it stays at or above
    its guarantee in every resource, memory included: of two allocations holding 8
    GiB against a guarantee of 4, one goes (kills the memory sum starting at 1 byte)."""
    gib = 1024**3
    quotas = [Quota("v", guaranteed=Resources(memory_bytes=4 * gib))]
    s = cluster([("n1", 0, "H100")], quotas)
    for aid, age in (("v1", 1000.0), ("v2", 900.0)):
        a = s.submit("v", Shape.of(0, memory_bytes=4 * gib), priority=-1, alloc_id=aid)
        a.state = AllocationState.ALLOCATED
        a.placements = (Placement("n1", ()),)
        a.allocate_time = s.now - age
    s.nodes["n1"].memory_bytes = 8 * gib
    req = s.submit("r", Shape.of(0, memory_bytes=4 * gib), priority=1)
    d = s.step()
    assert victims(d) == {"v2"}
    assert admitted(d) == [req.id]


def test_an_unused_cpu_guarantee_does_not_protect_gpu_work() -> None:
    """Preemption by priority: taking a victim lowers its tenant only in what the victim
    holds; a CPU guarantee the tenant does not use does not protect its GPU work
    (kills resources the victims free nothing of being judged)."""
    quotas = [Quota("v", guaranteed=Resources(cpu_millis=4000))]
    s = cluster([("n1", 2, "H100")], quotas)
    run(s, "v", "n1", [0, 1], priority=-1, aid="gpu_work")
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"gpu_work"}
    assert admitted(d) == [req.id]


def test_one_larger_victim_beats_two_of_lower_priority() -> None:
    """Preemption: "the fewest victims, then the lowest priority": one 2-GPU allocation
    at priority 0 goes rather than two 1-GPU ones at -2 (kills the exact search
    starting at two victims)."""
    s = cluster([("n1", 4, "H100")])
    run(s, "y", "n1", [0, 1], priority=0, aid="one")
    run(s, "y", "n1", [2], priority=-2, aid="low1")
    run(s, "y", "n1", [3], priority=-2, aid="low2")
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"one"}
    assert admitted(d) == [req.id]


def test_greedy_search_keeps_the_least_valuable_victims() -> None:
    """Preemption on a node where the exact search runs out of its budget of candidate
    sets (the first 256 all hold both of g's allocations, of which one may go): the
    documented greedy fallback takes victims in victim order, skipping g2, then drops
    those not needed, the most valuable first, so the cheapest set remains (kills the
    trim done least valuable first, or not at all)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=1))]
    s = cluster([("n1", 16, "H100")], quotas)
    run(s, "g", "n1", [0], priority=-4, aid="g1", age=50)
    run(s, "g", "n1", [1], priority=-4, aid="g2", age=60)
    for i in range(4):  # x0 newest: the least valuable of the four
        run(s, "y", "n1", [2 + i], priority=-3, aid=f"x{i}", age=100.0 * (i + 1))
    run(s, "y", "n1", [6, 7], priority=-2, aid="pair", age=500)
    for i in range(8):
        run(s, "y", "n1", [8 + i], priority=-1, aid=f"o{i}", age=600.0 + i)
    req = s.submit("r", h100(6), priority=1)
    d = s.step()
    assert victims(d) == {"g1", "x0", "x1", "x2", "pair"}
    assert admitted(d) == [req.id]


def test_greedy_search_skips_a_victim_that_would_break_a_guarantee() -> None:
    """Preemption by priority, greedy fallback (the first 256 candidate sets all hold
    two of g's allocations, of which one may go): a victim that would take its tenant
    below its guarantee with those already taken is skipped, and the search goes on
    with the next (kills the skip turned into a stop, or judged without the victims
    already taken)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=11))]
    s = cluster([("n1", 16, "H100")], quotas)
    for i in range(12):
        run(s, "g", "n1", [i], priority=-3, aid=f"g{i:02d}", age=100.0 + i)
    for i in range(4):
        run(s, "o", "n1", [12 + i], priority=-1, aid=f"o{i}", age=300.0 + i)
    req = s.submit("r", h100(5), priority=1)
    d = s.step()
    assert victims(d) == {"g00", "o0", "o1", "o2", "o3"}
    assert admitted(d) == [req.id]


def _quarter_victims(s: Simulator, shape: Shape, gpus_each: int) -> None:
    for i in range(4):
        a = s.submit("y", shape, priority=-1, alloc_id=f"v{i}")
        a.state = AllocationState.ALLOCATED
        a.placements = (Placement("n1", tuple(range(i * gpus_each, (i + 1) * gpus_each))),)
        a.allocate_time = s.now - 1000 - i


def test_a_gangs_second_replica_reuses_the_node_of_its_first() -> None:
    """Preemption of a gang: "placed whole or not at all", its replicas one by one; the
    second replica searches the node where the first took victims, among the victims
    left there, in GPUs, CPU and memory alike (kills `_lower_bound`, the bound on how
    many of a node's remaining victims a replica needs, ruling the node out wrongly)."""
    gib = 1024**3
    cases = [
        (Shape.of(2), Shape.of(4), 2),
        (Shape.of(0, cpu_millis=2000), Shape.of(0, cpu_millis=4000), 0),
        (Shape.of(0, memory_bytes=2 * gib), Shape.of(0, memory_bytes=4 * gib), 0),
    ]
    for victim_shape, replica, gpus_each in cases:
        s = cluster([("n1", 8, "H100")])
        s.nodes["n1"].cpu_millis = 8000
        s.nodes["n1"].memory_bytes = 8 * gib
        _quarter_victims(s, victim_shape, gpus_each)
        req = s.submit("r", replica, count=2, priority=1)
        d = s.step()
        assert victims(d) == {"v0", "v1", "v2", "v3"}, replica
        assert admitted(d) == [req.id], replica


def test_a_gangs_second_replica_takes_one_large_victim_over_two_elsewhere() -> None:
    """Preemption, "the fewest victims ... compared across all nodes", for the second
    replica of a gang: on n1, where the first replica took A, one victim (A2) still
    frees a whole replica, so it is taken rather than two lower-priority ones on n2;
    in GPUs, CPU and memory alike (kills the bound on the victims a node needs
    counting the smallest ones first, or one too many, which ranks n1 after n2 and
    prunes it)."""
    gib = 1024**3

    def unit(resource: str, n: int) -> Shape:
        if resource == "gpus":
            return Shape.of(n)
        if resource == "cpu":
            return Shape.of(0, cpu_millis=1000 * n)
        return Shape.of(0, memory_bytes=n * gib)

    for resource in ("gpus", "cpu", "memory"):
        s = cluster([("n1", 12, "H100"), ("n2", 8, "H100")])
        if resource != "gpus":
            s.nodes["n1"].cpu_millis, s.nodes["n2"].cpu_millis = 12_000, 8000
            s.nodes["n1"].memory_bytes, s.nodes["n2"].memory_bytes = 12 * gib, 8 * gib
        used = {"n1": 0, "n2": 0}
        layout = [("n1", "A", 4, -1), ("n1", "A2", 4, -1), ("n1", "B", 2, -1)]
        layout += [("n1", "C", 1, -1), ("n1", "D", 1, -1)]
        layout += [("n2", x, 2, -2) for x in ("E", "F", "G", "H")]
        for i, (node, aid, size, prio) in enumerate(layout):
            a = s.submit("y", unit(resource, size), priority=prio, alloc_id=aid)
            a.state = AllocationState.ALLOCATED
            gpus = range(used[node], used[node] + size) if resource == "gpus" else ()
            a.placements = (Placement(node, tuple(gpus)),)
            a.allocate_time = s.now - 1000 - i
            used[node] += size
        req = s.submit("r", unit(resource, 4), count=2, priority=1)
        d = s.step()
        assert victims(d) == {"A", "A2"}, resource
        assert admitted(d) == [req.id], resource


def test_one_quota_victim_beats_two_of_lower_priority() -> None:
    """Preemption, "the fewest victims" when only quota binds (capacity is free on an
    H100 node, the tenant's work sits on A100s): one 2-GPU allocation goes rather than
    two 1-GPU ones of lower priority (kills the quota-only search starting at two)."""
    s = cluster([("n1", 8, "H100"), ("n2", 8, "A100")], [Quota("t", limit=Resources(gpus=4))])
    run(s, "t", "n2", [0, 1], priority=0, aid="one")
    run(s, "t", "n2", [2], priority=-2, aid="low1")
    run(s, "t", "n2", [3], priority=-2, aid="low2")
    req = s.submit("t", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"one"}
    assert admitted(d) == [req.id]


def test_victims_free_capacity_on_the_node_and_quota_elsewhere() -> None:
    """Preemption when both capacity and quota bind: one victim frees the H100 node
    (another tenant's), one frees the tenant's quota (its own, on an A100 node); one
    search weighs both (kills the node search leaving out quota victims elsewhere)."""
    s = cluster([("n1", 2, "H100"), ("n2", 8, "A100")], [Quota("t", limit=Resources(gpus=2))])
    run(s, "y", "n1", [0, 1], priority=-1, aid="capacity")
    run(s, "t", "n2", [0, 1], priority=-1, aid="quota")
    req = s.submit("t", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"capacity", "quota"}
    assert admitted(d) == [req.id]


def test_a_gangs_second_replica_looks_past_a_node_it_emptied() -> None:
    """Preemption of a gang: once the first replica took every victim of n1, the
    second replica's search skips n1 and goes on to n2 (kills the search stopping at
    the first node with no victims left)."""
    s = cluster([("n1", 8, "H100"), ("n2", 8, "H100")])
    run(s, "y", "n1", range(8), priority=-1, aid="newer", age=100)
    run(s, "y", "n2", range(8), priority=-1, aid="older", age=200)
    req = s.submit("r", h100(8), count=2, priority=1)
    d = s.step()
    assert victims(d) == {"newer", "older"}
    assert admitted(d) == [req.id]


def test_nodes_are_searched_by_how_few_victims_they_need() -> None:
    """Preemption, "the fewest victims ... compared across all nodes": the node one
    victim frees is searched first, though another node's victims have lower priority
    and a third's are newer (kills ranking nodes by their best victim before their
    bound, which prunes the one-victim node)."""
    s = cluster([("n1", 4, "H100"), ("n2", 4, "H100"), ("n3", 4, "H100")])
    run(s, "y", "n1", range(4), priority=-1, aid="whole", age=5000)
    run(s, "y", "n2", [0, 1], priority=-2, aid="half1", age=3000)
    run(s, "y", "n2", [2, 3], priority=-2, aid="half2", age=3000)
    for i in range(4):
        run(s, "y", "n3", [i], priority=-1, aid=f"quarter{i}", age=100)
    req = s.submit("r", h100(4), priority=1)
    d = s.step()
    assert victims(d) == {"whole"}
    assert admitted(d) == [req.id]


def test_a_node_needing_as_few_victims_is_still_searched() -> None:
    """Preemption, "then the lowest priority ... compared across all nodes": n1 ranks
    first (its smallest victim has the lowest priority) but only its priority-0 victim
    frees enough; n2, needing one victim too, offers one at -1 and wins (kills pruning
    nodes whose bound equals the best set's size)."""
    s = cluster([("n1", 3, "H100"), ("n2", 2, "H100")])
    run(s, "y", "n1", [0], priority=-3, aid="small")
    run(s, "y", "n1", [1, 2], priority=0, aid="big0")
    run(s, "y", "n2", [0, 1], priority=-1, aid="big1")
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"big1"}
    assert admitted(d) == [req.id]


def test_quota_bound_request_takes_the_fewest_victims_among_ten() -> None:
    """Preemption, "the fewest victims" (issue 9: no larger than any single-node
    alternative): org holds 15 GPUs against its limit of 7, so a 2-GPU request of
    org/a must free 10: r02 (3) with r01, r03, r05 (2 each) and one 1-GPU allocation
    do it with 5 victims. (The exact search once started at 1 victim and spent its
    budget on sets too small to free the quota; the greedy fallback then took 6.)"""
    quotas = [Quota("org", limit=Resources(gpus=7))]
    s = cluster(
        [("n0", 6, "H100"), ("n1", 2, "H100"), ("n2", 6, "H100"), ("n3", 4, "H100")], quotas
    )
    gang = s.submit("org/a", Shape.of(1), count=2, priority=0, alloc_id="r01")
    gang.state = AllocationState.ALLOCATED
    gang.placements = (Placement("n0", (0,)), Placement("n1", (0,)))
    gang.allocate_time = s.now - 3884
    layout = [
        ("r02", "org/a", "n0", [1, 2, 3], 2, 1787),
        ("r03", "org/ab", "n0", [4, 5], 2, 6812),
        ("r04", "org/a", "n1", [1], 1, 54),
        ("r05", "org/a", "n2", [0, 1], 0, 6018),
        ("r06", "org/a", "n2", [2], 1, 637),
        ("r07", "org/a", "n2", [3], 2, 694),
        ("r08", "org/a", "n2", [4], 0, 572),
        ("r09", "org/a", "n2", [5], 1, 1946),
        ("r10", "org/a", "n3", [0], -1, 255),
    ]
    for aid, tenant, node, gpus, prio, age in layout:
        run(s, tenant, node, gpus, priority=prio, aid=aid, age=age)
    req = s.submit("org/a", h100(2), priority=3)
    d = s.step()
    assert admitted(d) == [req.id]
    assert len(victims(d)) == 5


def _placed(
    s: Simulator,
    tenant: str,
    spots: Sequence[tuple[str, Sequence[int]]],
    *,
    priority: int,
    aid: str,
    age: float = 1000.0,
) -> Allocation:
    """A running allocation with one replica per (node, GPU indices) of `spots`."""
    a = s.submit(
        tenant, Shape.of(len(spots[0][1])), count=len(spots), priority=priority, alloc_id=aid
    )
    a.state = AllocationState.ALLOCATED
    a.placements = tuple(Placement(n, tuple(g)) for n, g in spots)
    a.allocate_time = s.now - age
    return a


def test_exact_search_reaches_a_set_of_all_but_one_candidate() -> None:
    """Preemption by priority within others' guarantees: of three victims on the only
    node, g's two may not both go (g keeps its guarantee), so the one sufficient set is
    g2 with x, two of three candidates. The exact search must try sets that large
    (kills `_cheapest` stopping two sizes short, where the greedy fallback, having taken
    g1 first, can no longer take g2 and finds nothing)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=1))]
    s = cluster([("n1", 4, "H100")], quotas)
    run(s, "g", "n1", [0], priority=-4, aid="g1")
    run(s, "g", "n1", [1, 2], priority=-3, aid="g2")
    run(s, "y", "n1", [3], priority=-2, aid="x")
    req = s.submit("r", h100(3), priority=1)
    d = s.step()
    assert victims(d) == {"g2", "x"}
    assert admitted(d) == [req.id]
    assert s.held_gpus("g") >= 1  # the guarantee kept


def test_greedy_search_of_a_later_replica_counts_the_earlier_replicas_victims() -> None:
    """Preemption of a gang within others' guarantees: g may lose one allocation in all
    (it holds 24 against a guarantee of 23). Both nodes exhaust the exact search's
    budget (its first 256 sets all hold two of g's), so the greedy fallback answers for
    each replica; the first replica takes one of g's, and the second must skip g's
    (judged with the first's victims) and take four of o's instead (kills the greedy
    skip forgetting the earlier replicas' victims: it then takes one of g's first, can
    never fit the guarantee again, and leaves the gang pending)."""
    quotas = [Quota("g", guaranteed=Resources(gpus=23))]
    s = cluster([("n1", 16, "H100"), ("n2", 16, "H100")], quotas)
    for k, node in enumerate(("n1", "n2")):
        for i in range(12):
            run(s, "g", node, [i], priority=-3, aid=f"g{k}{i:02d}", age=100.0 + 20 * k + i)
        for i in range(4):
            run(s, "o", node, [12 + i], priority=-1, aid=f"o{k}{i}", age=500.0 + 20 * k + i)
    req = s.submit("r", h100(4), count=2, priority=1)
    d = s.step()
    assert admitted(d) == [req.id]
    taken = victims(d)
    assert len(taken) == 8
    assert len([v for v in taken if v.startswith("g")]) == 1  # g keeps its guarantee
    assert s.held_gpus("g") >= 23


def test_greedy_search_frees_quota_as_well_as_capacity() -> None:
    """Quota: admission never lets a tenant exceed its limit, also when preemption's
    exact search runs out of budget (24 candidates, sets of 4 too small for the 8
    victims needed) and the greedy fallback answers: it must go on past the victims
    that free the node (y's, first in victim order) until t's own free its quota, and
    its trim must keep those (kills the greedy's fit and its trim judging the node
    only: the set then frees no quota, fails the whole request's check, and the request
    stays pending though 8 victims admit it)."""
    s = cluster([("n1", 16, "H100"), ("n2", 8, "A100")], [Quota("t", limit=Resources(gpus=8))])
    for i in range(16):
        run(s, "y", "n1", [i], priority=-2, aid=f"y{i:02d}", age=100.0 + i)
    for i in range(8):
        run(s, "t", "n2", [i], priority=-1, aid=f"t{i}", age=200.0 + i)
    req = s.submit("t", h100(4), priority=1)
    d = s.step()
    assert admitted(d) == [req.id]
    # The newest four of each (least work lost): four free the node, four t's quota.
    assert victims(d) == {"y00", "y01", "y02", "y03", "t0", "t1", "t2", "t3"}
    assert s.held_gpus("t") <= 8


HOLD = SchedulerConfig(
    min_runtime_seconds=0,
    preemption_grace_seconds=0,
    max_preemptions_per_cycle=64,
    starvation_seconds=0,
    max_held_gangs=1,
)


def test_preemptor_below_a_starving_gang_reclaims_beside_its_held_node() -> None:
    """Holds for starving gangs keep work of the gang's priority or lower off the held
    node ("no head-of-line blocking ... yet it is not starved"), also for a preemptor:
    gang G (16 GPUs, priority -1) holds n1, whose 4 free GPUs a priority -2 gang of 2x4
    may not take. It preempts V1 (n2) and V2 (n3) instead, and is placed whole (kills the
    search judging a replica's fit, or placing it on trial, without its priority: it
    then counts n1's held GPUs as its own, picks too few victims and stays pending)."""
    s = cluster([("n1", 16, "H100"), ("n2", 8, "H100"), ("n3", 4, "H100")], config=HOLD)
    run(s, "x", "n1", range(12), priority=5, aid="X")
    run(s, "x", "n2", [0, 1], priority=5, aid="Y")
    run(s, "v", "n2", range(2, 8), priority=-3, aid="V1", age=100)  # newest: chosen first
    run(s, "v", "n3", range(4), priority=-3, aid="V2", age=200)
    gang = s.submit("g", h100(16), priority=-1)
    req = s.submit("r", h100(4), count=2, priority=-2)
    d = s.step()
    assert list(d.held_nodes[gang.id]) == ["n1"]
    assert victims(d) == {"V1", "V2"}
    assert admitted(d) == [req.id]
    placed = {p.node_id for a in d.admissions for p in a.placements}
    assert placed == {"n2", "n3"}


def test_a_gangs_replicas_stay_on_gpu_models_its_quota_allows() -> None:
    """Quota per GPU model: a tenant whose limit allows no A100 never gets one, also
    when preemption places a gang replica by replica: the idle A100 node is no place for
    its first replica (kills the trial placement ignoring the allowed models: the
    second replica then finds room where the first one's victim left it, too few
    victims are chosen, and the gang stays pending)."""
    quotas = [Quota("r", limit=Resources(gpus_by_model={"A100": 0}))]
    s = cluster([("n1", 4, "A100"), ("n2", 8, "H100"), ("n3", 4, "H100")], quotas)
    run(s, "x", "n2", [0, 1], priority=5, aid="Y")
    run(s, "v", "n2", range(2, 8), priority=-3, aid="V1", age=100)
    run(s, "v", "n3", range(4), priority=-3, aid="V2", age=200)
    req = s.submit("r", Shape.of(4), count=2, priority=1)
    d = s.step()
    assert victims(d) == {"V1", "V2"}
    assert admitted(d) == [req.id]
    placed = {p.node_id for a in d.admissions for p in a.placements}
    assert placed == {"n2", "n3"}


def test_final_minimality_drops_the_most_valuable_redundant_victim() -> None:
    """Preemption: minimality (removing any one victim leaves the preemptor unplaceable)
    and "the lowest priority": a 3x4 gang's replicas take A (n1), then B (n2), then the
    2-node gang C (n3, n4), which alone frees two replicas' room, so A or B is
    redundant. The final pass drops the most valuable of them first, B, and keeps
    {A, C}, the cheapest sufficient set (kills the pass dropped, run least valuable
    first, which keeps the costlier {B, C}, or testing single victims alone)."""
    s = cluster([("n1", 8, "H100"), ("n2", 8, "H100"), ("n3", 4, "H100"), ("n4", 4, "H100")])
    run(s, "x", "n1", range(4), priority=5, aid="X1")
    run(s, "x", "n2", range(4), priority=5, aid="X2")
    run(s, "a", "n1", range(4, 8), priority=-5, aid="A")
    run(s, "b", "n2", range(4, 8), priority=-3, aid="B")
    _placed(s, "c", [("n3", range(4)), ("n4", range(4))], priority=-2, aid="C")
    req = s.submit("r", h100(4), count=3, priority=1)
    d = s.step()
    assert victims(d) == {"A", "C"}
    assert admitted(d) == [req.id]


def test_a_node_whose_victims_cannot_free_enough_does_not_end_the_search() -> None:
    """Preemption, "compared across all nodes": n1 (first by id) passes the placement
    filters but its only victim frees 1 of the 2 GPUs the request lacks there; the
    search passes over it to n2 (kills the scan of candidate nodes stopping at the
    first node its victims cannot free)."""
    s = cluster([("n1", 2, "H100"), ("n2", 2, "H100")])
    run(s, "x", "n1", [0], priority=5, aid="keep")
    run(s, "y", "n1", [1], priority=-1, aid="too_small")
    run(s, "y", "n2", [0, 1], priority=-1, aid="enough")
    req = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"enough"}
    assert admitted(d) == [req.id]


def test_greedy_answers_for_a_gang_replica_by_replica() -> None:
    """Preemption of a gang within others' guarantees, on a node where the exact search
    runs out of budget for the first replica (its first 256 sets all hold both of g's,
    of which one may go): the greedy answers replica by replica and the gang is placed
    whole with 11 victims, g keeping its guarantee. (Written against `_cheapest`'s
    greedy trim disabled, which it does not kill: the second replica then takes the
    same 11 in the end; see MUTANTS.md.)"""
    quotas = [Quota("g", guaranteed=Resources(gpus=1))]
    s = cluster([("n1", 16, "H100")], quotas)
    run(s, "g", "n1", [0], priority=-4, aid="g1", age=50)
    run(s, "g", "n1", [1], priority=-4, aid="g2", age=60)
    for i in range(4):
        run(s, "y", "n1", [2 + i], priority=-3, aid=f"x{i}", age=100.0 * (i + 1))
    run(s, "y", "n1", [6, 7], priority=-2, aid="pair", age=500)
    for i in range(8):
        run(s, "y", "n1", [8 + i], priority=-1, aid=f"o{i}", age=600.0 + i)
    req = s.submit("r", h100(6), count=2, priority=1)
    d = s.step()
    assert admitted(d) == [req.id]
    assert len(victims(d)) == 11
    assert victims(d) >= {"g1", "x0", "x1", "x2", "x3", "pair"}
    assert "g2" not in victims(d)  # g keeps its guarantee


def test_a_gang_keeps_the_victims_found_when_the_check_budget_runs_out() -> None:
    """Preemption of a gang on a large cluster: the search is bounded (`CHECK_BUDGET`
    feasibility checks per request, documented), and when the budget runs out it
    settles for the best set found so far. Here 40 nodes each cost the exact search its
    whole budget of sets (each set's first two victims are g's, of which one may go)
    and the first two replicas spend 18,000 checks; the third finds a set on its first
    node and runs out of checks on the next ones: it keeps that set, and the gang is
    placed whole (kills the search dropping the set found when the budget runs out)."""
    n_nodes = 40
    quotas = [Quota("g", guaranteed=Resources(gpus=12 * n_nodes - 1))]
    s = cluster([(f"n{k:02d}", 16, "H100") for k in range(n_nodes)], quotas)
    for k in range(n_nodes):
        node = f"n{k:02d}"
        for i in range(12):
            run(s, "g", node, [i], priority=-3, aid=f"g{k:02d}{i:02d}", age=100.0 + 20 * k + i)
        for i in range(4):
            run(s, "o", node, [12 + i], priority=-1, aid=f"o{k:02d}{i}", age=5000.0 + 20 * k + i)
    req = s.submit("r", h100(4), count=3, priority=1)
    d = s.step()
    assert admitted(d) == [req.id]
    taken = victims(d)
    assert len(taken) == 12  # four per replica, each exactly what its node lacks
    assert len([v for v in taken if v.startswith("g")]) == 1  # g keeps its guarantee
    assert all("priority 1 over" in p.reason for p in d.preemptions)


def test_equal_priority_own_work_is_judged_one_by_one_by_arrival() -> None:
    """Per-tenant policy "within the tenant: lower or newer at equal priority": of two
    alike allocations of the requester's own tenant at its priority, only the one that
    arrived after the request may go, even when the older one started last (first in
    victim order) (kills the own tenant's victims judged by their class's first member,
    as other tenants' are: the newer one was then refused with the older one)."""
    quotas = [
        Quota("t", within_tenant_preemption=WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY)
    ]
    s = cluster([("n1", 2, "H100")], quotas)
    run(s, "t", "n1", [0], priority=0, aid="older", age=100)  # arrived first, started last
    req = s.submit("t", h100(1), priority=0)
    run(s, "t", "n1", [1], priority=0, aid="newer", age=1000)  # arrived after the request
    d = s.step()
    assert victims(d) == {"newer"}
    assert admitted(d) == [req.id]


def test_a_victim_taken_on_another_node_is_not_offered_again() -> None:
    """Preemption: "no GPU is ever held by two live allocations": two requests each
    preempt one of two victims on two nodes. The second request's victims are derived
    from the first's minus the one it took, and the node that victim leaves without
    victims must drop out (kills the derived set keeping that node, or its stale list of
    victims: the taken victim was offered again)."""
    s = cluster([("n1", 2, "H100"), ("n2", 2, "H100")])
    run(s, "y", "n1", [0, 1], priority=-1, aid="v1", age=100)
    run(s, "y", "n2", [0, 1], priority=-1, aid="v2", age=200)
    first = s.submit("r", h100(2), priority=1)
    second = s.submit("r", h100(2), priority=1)
    d = s.step()
    assert [p.allocation_id for p in d.preemptions] == ["v1", "v2"]
    assert admitted(d) == [first.id, second.id]
    assert {p.node_id for a in d.admissions for p in a.placements} == {"n1", "n2"}


def test_fewest_victims_under_a_per_model_limit() -> None:
    """Quota per GPU model and "the fewest victims": org may hold 7 H100 and holds 15,
    so a 2-GPU H100 request of org/a must free 10 H100 GPUs: 5 victims do it, and the
    exact search must start from the per-model bound, not give up on it (kills the
    quota bound mis-reading the per-model amounts: it crashes, or says no set can, and
    the greedy fallback takes 6)."""
    quotas = [Quota("org", limit=Resources(gpus_by_model={"H100": 7}))]
    s = cluster(
        [("n0", 6, "H100"), ("n1", 2, "H100"), ("n2", 6, "H100"), ("n3", 4, "H100")], quotas
    )
    gang = s.submit("org/a", h100(1), count=2, priority=0, alloc_id="r01")
    gang.state = AllocationState.ALLOCATED
    gang.placements = (Placement("n0", (0,)), Placement("n1", (0,)))
    gang.allocate_time = s.now - 3884
    layout = [
        ("r02", "org/a", "n0", [1, 2, 3], 2, 1787),
        ("r03", "org/ab", "n0", [4, 5], 2, 6812),
        ("r04", "org/a", "n1", [1], 1, 54),
        ("r05", "org/a", "n2", [0, 1], 0, 6018),
        ("r06", "org/a", "n2", [2], 1, 637),
        ("r07", "org/a", "n2", [3], 2, 694),
        ("r08", "org/a", "n2", [4], 0, 572),
        ("r09", "org/a", "n2", [5], 1, 1946),
        ("r10", "org/a", "n3", [0], -1, 255),
    ]
    for aid, tenant, node, gpus, prio, age in layout:
        a = s.submit(tenant, h100(len(gpus)), priority=prio, alloc_id=aid)
        a.state = AllocationState.ALLOCATED
        a.placements = (Placement(node, tuple(gpus)),)
        a.allocate_time = s.now - age
    req = s.submit("org/a", h100(2), priority=3)
    d = s.step()
    assert admitted(d) == [req.id]
    assert len(victims(d)) == 5
    assert s.held_gpus("org") <= 7


def test_a_per_model_limit_is_freed_by_that_model_only() -> None:
    """Quota per GPU model: t may hold 2 H100 and holds them; its lower-priority A100
    allocation frees none of that limit, so the H100 one goes, alone (kills the quota
    bound reading a victim without that model as None: the search crashed)."""
    quotas = [Quota("t", limit=Resources(gpus_by_model={"H100": 2}))]
    s = cluster([("n1", 2, "H100"), ("n2", 2, "H100"), ("n3", 2, "A100")], quotas)
    run(s, "t", "n2", [0, 1], priority=-1, aid="h100")
    a = s.submit("t", Shape.of(1, "A100"), priority=-2, alloc_id="a100")
    a.state = AllocationState.ALLOCATED
    a.placements = (Placement("n3", (0,)),)
    a.allocate_time = s.now - 1000
    req = s.submit("t", h100(2), priority=1)
    d = s.step()
    assert victims(d) == {"h100"}
    assert admitted(d) == [req.id]


def test_final_minimality_keeps_the_later_arrival_on_a_tie() -> None:
    """Preemption, "then the newest": as in the minimality case above, but A and B have
    the same priority and start time; A arrived first. The final pass drops the one
    that arrived first, keeping {B, C} (kills victim order's arrival tie-break
    reversed)."""
    s = cluster([("n1", 8, "H100"), ("n2", 8, "H100"), ("n3", 4, "H100"), ("n4", 4, "H100")])
    run(s, "x", "n1", range(4), priority=5, aid="X1")
    run(s, "x", "n2", range(4), priority=5, aid="X2")
    run(s, "a", "n1", range(4, 8), priority=-3, aid="A")
    run(s, "b", "n2", range(4, 8), priority=-3, aid="B")
    _placed(s, "c", [("n3", range(4)), ("n4", range(4))], priority=-2, aid="C")
    req = s.submit("r", h100(4), count=3, priority=1)
    d = s.step()
    assert victims(d) == {"B", "C"}
    assert admitted(d) == [req.id]


def test_a_victim_frees_exactly_the_cpu_and_memory_it_holds() -> None:
    """Preemption frees what victims hold, to the milli and the byte: on n1, A frees
    one milli (or byte) too little for the request, so B on n2 goes, though A is the
    cheaper victim (kills a victim counted as freeing one milli or byte more)."""
    gib = 1024**3
    for cpu, mem in ((4000, 0), (0, 4 * gib)):
        s = cluster([("n1", 0, "H100"), ("n2", 0, "H100")])
        for n in ("n1", "n2"):
            s.nodes[n].cpu_millis, s.nodes[n].memory_bytes = 8000, 8 * gib
        spots = [
            ("X", "n1", 5, cpu and cpu + 1, mem and mem + 1, 1000.0),
            ("A", "n1", -2, cpu and cpu - 1, mem and mem - 1, 100.0),
            ("Y", "n2", 5, cpu, mem, 1000.0),
            ("B", "n2", -1, cpu, mem, 1000.0),
        ]
        for aid, node, prio, c, m, age in spots:
            a = s.submit(
                "y", Shape.of(0, cpu_millis=c, memory_bytes=m), priority=prio, alloc_id=aid
            )
            a.state = AllocationState.ALLOCATED
            a.placements = (Placement(node, ()),)
            a.allocate_time = s.now - age
        req = s.submit("r", Shape.of(0, cpu_millis=cpu, memory_bytes=mem), priority=1)
        d = s.step()
        assert victims(d) == {"B"}, (cpu, mem)
        assert admitted(d) == [req.id], (cpu, mem)


def test_victims_on_a_gpu_model_the_quota_forbids_are_not_sought() -> None:
    """Quota per GPU model: r may hold no A100, so the cheaper victim on the A100 node
    frees nothing it may use; the H100 node's victim goes (kills the search's replica
    filter ignoring the allowed models: it chose the A100 victim, could not place the
    request there, and left it pending)."""
    quotas = [Quota("r", limit=Resources(gpus_by_model={"A100": 0}))]
    s = cluster([("n1", 2, "A100"), ("n2", 2, "H100")], quotas)
    run(s, "y", "n1", [0, 1], priority=-3, aid="on_a100", age=100)
    run(s, "y", "n2", [0, 1], priority=-1, aid="on_h100")
    req = s.submit("r", Shape.of(2), priority=1)
    d = s.step()
    assert victims(d) == {"on_h100"}
    assert admitted(d) == [req.id]


def test_nodes_tied_on_bound_and_best_victim_rank_by_node_id() -> None:
    """Preemption "compared across all nodes": the gang victim C is the best victim on
    both n1 and n2, which need two victims each; the search ranks them by node id and
    takes C with the newer of D and E (kills ranking ties by the nodes' victim lists,
    which cannot be compared)."""
    s = cluster([("n1", 4, "H100"), ("n2", 4, "H100")])
    _placed(s, "c", [("n1", [0, 1]), ("n2", [0, 1])], priority=-5, aid="C")
    run(s, "y", "n1", [2, 3], priority=-1, aid="D", age=100)
    run(s, "y", "n2", [2, 3], priority=-1, aid="E", age=200)
    req = s.submit("r", h100(4), priority=1)
    d = s.step()
    assert victims(d) == {"C", "D"}
    assert admitted(d) == [req.id]


def test_a_limit_no_allowed_victim_can_free_leaves_the_request_pending() -> None:
    """Quota: t is at its limit with work of higher priority than its request, so no
    victim may free its quota; another tenant's lower-priority work frees none of it and
    stays, and the request waits with the limit as its reason (kills the fallback
    candidate list of `_quota_candidates` mis-built: the search crashed)."""
    s = cluster([("n1", 4, "H100"), ("n2", 4, "A100")], [Quota("t", limit=Resources(gpus=2))])
    run(s, "t", "n2", [0, 1], priority=5, aid="mine")
    run(s, "y", "n2", [2, 3], priority=-1, aid="other")
    req = s.submit("t", h100(2), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert "over quota of tenant t" in d.pending[req.id].reason


# -- round 3: a victim tenant is judged only in what the request asks for ---------------
#
# The policy: a victim tenant's guarantee and fair share are judged only in the resources
# the preemptor asks for (the contended ones). Kueue does the same: its preemption only
# considers the flavor-resources the incoming workload needs (`frsNeedPreemption`), e.g.
# kubernetes-sigs/kueue pkg/scheduler/preemption/preemption_test.go, TestPreemption,
# "reclaim quota if workload requests 0 resources for a resource at nominal quota".

GIB = 1024**3
# Per resource (GPUs, CPU millis, memory bytes): the node's capacity of it.
NODE_CAP = {"gpu": 4, "cpu": 4000, "mem": 4 * GIB}


def _shape(amounts: dict[str, int]) -> Shape:
    return Shape.of(
        amounts.get("gpu", 0),
        cpu_millis=amounts.get("cpu", 0),
        memory_bytes=amounts.get("mem", 0),
    )


def _place(
    s: Simulator, tenant: str, aid: str, amounts: dict[str, int], gpus: Sequence[int]
) -> None:
    a = s.submit(tenant, _shape(amounts), priority=0, alloc_id=aid)
    a.state = AllocationState.ALLOCATED
    a.placements = (Placement("n1", tuple(gpus)),)
    a.allocate_time = s.now - 1000


def _under_a_cpu_or_memory_guarantee(res: str) -> Simulator:
    """v guaranteed 1 GPU and 8 CPUs (or 8 GiB) holds a 4-GPU job with a quarter of that
    CPU (memory): over its GPU guarantee, under its `res` one; g is guaranteed 4 GPUs."""
    cap = {"cpu": 8000, "mem": 8 * GIB}[res]
    guaranteed = (
        Resources(gpus=1, cpu_millis=cap) if res == "cpu" else Resources(gpus=1, memory_bytes=cap)
    )
    quotas = [Quota("v", guaranteed=guaranteed), Quota("g", guaranteed=Resources(gpus=4))]
    s = cluster([("n1", 4, "H100")], quotas)
    s.nodes["n1"].cpu_millis, s.nodes["n1"].memory_bytes = 16000, 16 * GIB
    _place(s, "v", "vwork", {"gpu": 4, res: cap // 4}, [0, 1, 2, 3])
    return s


def test_a_cpu_guarantee_does_not_shield_gpu_work_from_a_gpu_only_reclaim() -> None:
    """Preemption, reclaim: v is under its CPU guarantee (2 of 8 CPUs) but over its GPU
    guarantee (4 of 1); g, under its GPU guarantee, asks 4 GPUs and no CPU. Only GPUs
    are judged, so g reclaims v's GPU job though that job holds CPU as well (kills
    `_Search.__init__` judging CPU or memory the request does not ask for, `dims`
    `cpu >= 0` / `mem >= 0`, and `_tenants_ok` judging every resource the victims free)."""
    for res in ("cpu", "mem"):
        s = _under_a_cpu_or_memory_guarantee(res)
        req = s.submit("g", h100(4), priority=-5)  # reclaim: at any priority
        d = s.step()
        assert victims(d) == {"vwork"}, res
        assert admitted(d) == [req.id], res


def test_a_cpu_guarantee_still_protects_cpu_the_request_asks_for() -> None:
    """Preemption, reclaim, the other side of the rule: when g asks CPU as well, v's CPU
    guarantee is judged, and v (under it) keeps its job (kills the CPU ask, or an ask
    of exactly 1 milli, not being judged: `dims` `cpu > 1`; and the same in memory)."""
    for res in ("cpu", "mem"):
        s = _under_a_cpu_or_memory_guarantee(res)
        req = s.submit("g", _shape({"gpu": 4, res: 1}), priority=-5)  # 1 milli / 1 byte
        d = s.step()
        assert victims(d) == set(), res
        assert req.id in d.pending, res


def _fair_share_case(asked: str, other: str, ask_other: int) -> tuple[Simulator, Allocation]:
    """n1 is full of v's two jobs, each 2 units of `asked` (half the node) and a little of
    `other`. w waits, at a low priority, for the whole node's `other`: that resource is
    contended and v stands at its fair share of it (its whole demand). r, with nothing,
    asks half the node's `asked` (its fair share) and `ask_other` of `other`."""
    s = cluster([("n1", NODE_CAP["gpu"], "H100")])
    s.nodes["n1"].cpu_millis, s.nodes["n1"].memory_bytes = NODE_CAP["cpu"], NODE_CAP["mem"]
    half = NODE_CAP[asked] // 2
    little = NODE_CAP[other] // 4 if other != "gpu" else 1
    gpu_ids = iter(range(NODE_CAP["gpu"]))
    for aid in ("v1", "v2"):
        held = {asked: half, other: little}
        _place(s, "v", aid, held, [next(gpu_ids) for _ in range(held.get("gpu", 0))])
    s.submit("w", _shape({other: NODE_CAP[other]}), priority=-5, alloc_id="w")
    req = s.submit("r", _shape({asked: half, other: ask_other}), priority=0)
    return s, req


def test_fair_share_is_judged_only_in_the_resources_the_request_asks_for() -> None:
    """Preemption, fair share: r, below its fair share in what it asks, takes one of v's
    two jobs (v keeps its fair share of the asked resource); v is at its fair share of
    a contended resource r does not ask for, and that does not protect it (kills
    `_Search.__init__` `dims` judging an unasked resource: `gpus >= 0`, `cpu >= 0`,
    `mem >= 0`)."""
    for asked, other in (("gpu", "cpu"), ("gpu", "mem"), ("cpu", "gpu")):
        s, req = _fair_share_case(asked, other, 0)
        d = s.step()
        assert len(victims(d)) == 1 and victims(d) <= {"v1", "v2"}, (asked, other)
        assert admitted(d) == [req.id], (asked, other)


def test_an_ask_of_one_milli_or_byte_has_its_fair_share_judged() -> None:
    """Preemption, fair share: the same case, but r also asks exactly 1 CPU milli (or 1
    byte) of the contended resource v stands at its fair share of: that resource is
    judged, and v keeps its work (kills `dims` `cpu > 1` and `mem > 1`)."""
    for other in ("cpu", "mem"):
        s, req = _fair_share_case("gpu", other, 1)
        d = s.step()
        assert victims(d) == set(), other
        assert req.id in d.pending, other


def test_a_guarantee_in_an_asked_resource_the_victim_does_not_hold_is_not_judged() -> None:
    """Preemption: taking a victim lowers its tenant only in what the victim holds. The
    request asks CPU too, but v's GPU job holds no CPU, so v's unused CPU guarantee does
    not protect it (kills `_tenants_ok` judging a resource the set frees none of,
    `s[i] < 0`)."""
    quotas = [Quota("v", guaranteed=Resources(cpu_millis=4000))]
    s = cluster([("n1", 2, "H100")], quotas)
    run(s, "v", "n1", [0, 1], priority=-1, aid="gpu_work")
    req = s.submit("r", Shape.of(2, "H100", cpu_millis=1000), priority=1)
    d = s.step()
    assert victims(d) == {"gpu_work"}
    assert admitted(d) == [req.id]
