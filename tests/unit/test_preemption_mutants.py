"""Preemption promises that mutation testing (`make mutate`) showed no test kept.

Each test states a README/SPEC promise (Quota, Preemption) on a small cluster; the
mutants of `scheduler/preemption.py` each one kills are named in its docstring. Victims
sit on A100 nodes while the request asks for H100 GPUs where it is so: then no victim
frees capacity the request could use, and only the *quota* search (victims anywhere in
the subtree whose limit binds) can find them.
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
