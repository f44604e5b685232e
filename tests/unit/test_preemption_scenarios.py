"""Preemption scenarios: the cases of issue 9, and cases translated from the test suites of
Kueue (pkg/scheduler/preemption/preemption_test.go), KAI Scheduler
(pkg/scheduler/actions/reclaim/reclaimGang_test.go) and YuniKorn
(pkg/scheduler/objects/preemption_test.go). Each names its source; where rmgrpc decides
otherwise on purpose, the test says so (and the README's "Preemption" documents it).

Their CPU units, queues and ClusterQueues become GPUs and tenants; "nominal quota" and
"deserved" become `guaranteed`, "borrowing limit"/"max" become `limit`.
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
GRACE = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=30)


def cluster(
    gpus: Sequence[int], quotas: Sequence[Quota] = (), config: SchedulerConfig = NO_WAIT
) -> Simulator:
    """Nodes n1, n2, … with the given GPU counts."""
    nodes = [make_node(f"n{i}", g) for i, g in enumerate(gpus, start=1)]
    return Simulator(nodes, quotas, config)


def run(
    s: Simulator,
    tenant: str,
    where: Sequence[tuple[str, Sequence[int]]],
    *,
    priority: int = 0,
    age: float = 1000.0,
    aid: str | None = None,
) -> Allocation:
    """A running allocation: one replica per (node, GPU indices), started `age` s ago."""
    per = len(where[0][1])
    a = s.submit(tenant, Shape.of(per), len(where), priority=priority, alloc_id=aid)
    a.state = AllocationState.ALLOCATED
    a.placements = tuple(Placement(n, tuple(g)) for n, g in where)
    a.allocate_time = s.now - age
    return a


def victims(d: Decisions) -> set[str]:
    return {p.allocation_id for p in d.preemptions}


def admitted(d: Decisions) -> list[str]:
    return [a.allocation_id for a in d.admissions]


# -- the cases of issue 9 -------------------------------------------------------------


def test_limit_bound_preempts_only_mid() -> None:
    """Issue 9, "Fewest victims, only sometimes": low (-1, 1 GPU), mid (0, 2) and high
    (1, 3) fill the tenant's limit of 6; a priority-1 request for 2 preempts mid alone."""
    s = cluster([8, 8], [Quota("t", limit=Resources(gpus=6))])
    run(s, "t", [("n1", [0])], priority=-1, aid="low")
    run(s, "t", [("n1", [1, 2])], priority=0, aid="mid")
    run(s, "t", [("n2", [0, 1, 2])], priority=1, aid="high")
    req = s.submit("t", Shape.of(2), priority=1)
    d = s.step()
    assert victims(d) == {"mid"}
    assert admitted(d) == [req.id]


def test_capacity_bound_preempts_only_mid() -> None:
    """Issue 9: the same case bounded by capacity (one 6-GPU node) also takes mid alone."""
    s = cluster([6])
    run(s, "t", [("n1", [0])], priority=-1, aid="low")
    run(s, "t", [("n1", [1, 2])], priority=0, aid="mid")
    run(s, "t", [("n1", [3, 4, 5])], priority=1, aid="high")
    req = s.submit("t", Shape.of(2), priority=1)
    d = s.step()
    assert victims(d) == {"mid"}
    assert admitted(d) == [req.id]


def test_nine_gpu_borrower_is_reclaimed_below_its_guarantee() -> None:
    """Issue 9, "A guarantee that can be blocked forever": a 9-GPU job against a
    guarantee of 3 is what makes its owner borrow; the owner of a guarantee of 8 reclaims it."""
    quotas = [Quota("b", guaranteed=Resources(gpus=3)), Quota("g", guaranteed=Resources(gpus=8))]
    s = cluster([10], quotas)
    run(s, "b", [("n1", range(9))], priority=5, aid="big")
    req = s.submit("g", Shape.of(8))
    d = s.step()
    assert victims(d) == {"big"}
    assert "reclaims its guaranteed quota from borrower b" in d.preemptions[0].reason
    assert admitted(d) == [req.id]


def test_gang_of_two_times_ten_is_reclaimed() -> None:
    """Issue 9: a 2x10 gang against a guarantee of 10 is reclaimed for a tenant under its
    guarantee of 10 (KAI's "job reclaims from job on two nodes" has the same shape)."""
    quotas = [Quota("b", guaranteed=Resources(gpus=10)), Quota("g", guaranteed=Resources(gpus=10))]
    s = cluster([10, 10], quotas)
    run(s, "b", [("n1", range(10)), ("n2", range(10))], aid="gang")
    req = s.submit("g", Shape.of(10))
    d = s.step()
    assert victims(d) == {"gang"}
    assert admitted(d) == [req.id]


def test_newest_is_chosen_across_nodes() -> None:
    """Issue 9, '"Newest" decided per node': the oldest job is on n1, the newest on n3."""
    s = cluster([4, 4, 4])
    run(s, "x", [("n1", range(4))], age=9000, aid="oldest")
    run(s, "x", [("n2", range(4))], age=5000, aid="middle")
    run(s, "x", [("n3", range(4))], age=100, aid="newest")
    req = s.submit("y", Shape.of(4), priority=1)
    d = s.step()
    assert victims(d) == {"newest"}
    assert admitted(d) == [req.id]


def test_borrowed_capacity_before_own_lower_priority_work() -> None:
    """Issue 9, "Own work before borrowed work": under its guarantee, g reclaims from the
    borrower b rather than preempting its own lower-priority job."""
    quotas = [Quota("g", guaranteed=Resources(gpus=8))]
    s = cluster([8], quotas)
    run(s, "g", [("n1", range(4))], priority=0, aid="own-low")
    run(s, "b", [("n1", range(4, 8))], priority=0, aid="borrowed")
    req = s.submit("g", Shape.of(4), priority=5)
    d = s.step()
    assert victims(d) == {"borrowed"}
    assert admitted(d) == [req.id]


def test_priority_mode_never_takes_equal_priority() -> None:
    """Issue 9, "Gaps the suite does not see": priority preemption is strictly lower."""
    s = cluster([4])
    run(s, "x", [("n1", range(4))], priority=3, aid="equal")
    req = s.submit("y", Shape.of(4), priority=3)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_pending_reason_names_what_it_reclaims() -> None:
    """Issue 9: the reason names the reclaim and from whom, while victims are in grace."""
    quotas = [Quota("g", guaranteed=Resources(gpus=4))]
    s = cluster([4], quotas, GRACE)
    run(s, "b", [("n1", range(4))], aid="borrowed")
    req = s.submit("g", Shape.of(4))
    d = s.step()
    assert victims(d) == {"borrowed"}
    assert d.pending[req.id].reason.startswith(
        "reclaiming its guaranteed quota from b: waiting for 1 preempted allocation"
    )
    d = s.step()  # the next pass says the same, from the victims' recorded reason
    assert d.pending[req.id].reason.startswith("reclaiming its guaranteed quota from b:")


def test_pending_reason_when_reclaim_is_not_possible_yet() -> None:
    """A tenant under its guarantee whose borrowers are all too young says whom it waits
    to reclaim from, not just that GPUs are busy."""
    cfg = SchedulerConfig(min_runtime_seconds=600, preemption_grace_seconds=0)
    s = cluster([4], [Quota("g", guaranteed=Resources(gpus=4))], cfg)
    run(s, "b", [("n1", range(4))], age=10, aid="young")
    req = s.submit("g", Shape.of(4))
    d = s.step()
    assert victims(d) == set()
    assert "tenant g is under its guarantee (holds 0 of 4 GPUs)" in d.pending[req.id].reason
    assert "waiting to reclaim from borrowers b (4 GPUs)" in d.pending[req.id].reason


# -- Kueue: pkg/scheduler/preemption/preemption_test.go ------------------------------


def test_kueue_reclaim_borrowed_quota_from_same_priority_for_reclaim_from_any() -> None:
    """Kueue "reclaim borrowed quota from same priority for withinCohort=ReclaimFromAny":
    c1 (nominal 6) holds 4 at priority 0 and 4 at priority 1; c2 (nominal 6) holds 2 and
    asks 4 at priority 0. Kueue preempts c1-1; so does rmgrpc (the lower priority of the
    two that would do, on its node)."""
    quotas = [Quota("c1", guaranteed=Resources(gpus=6)), Quota("c2", guaranteed=Resources(gpus=6))]
    s = cluster([6, 6], quotas)
    run(s, "c1", [("n1", range(4))], priority=0, aid="c1-1")
    run(s, "c1", [("n2", range(4))], priority=1, aid="c1-2")
    run(s, "c2", [("n1", [4, 5])], aid="c2")
    req = s.submit("c2", Shape.of(4))
    d = s.step()
    assert victims(d) == {"c1-1"}
    assert admitted(d) == [req.id]


def test_kueue_do_not_reclaim_same_priority_for_reclaim_from_lower_priority() -> None:
    """Kueue "do not reclaim borrowed quota from same priority for
    withinCohort=ReclaimFromLowerPriority": with that policy nothing is preempted.
    (Differs on purpose: rmgrpc's default is ANY, so a guarantee is always reachable;
    Kueue's default is Never.)"""
    quotas = [
        Quota(
            "c1",
            guaranteed=Resources(gpus=6),
            reclaim_from_others=ReclaimPolicy.LOWER_PRIORITY,
        ),
        Quota("c2", guaranteed=Resources(gpus=6)),
    ]
    s = cluster([10], quotas)
    run(s, "c1", [("n1", [0, 1])], aid="c1")
    run(s, "c2", [("n1", [2, 3, 4, 5])], aid="c2-1")
    run(s, "c2", [("n1", [6, 7, 8, 9])], aid="c2-2")
    req = s.submit("c1", Shape.of(4))
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending
    # The default policy reclaims: the newest of c2's (equal-priority) jobs.
    s.quotas["c1"].reclaim_from_others = ReclaimPolicy.ANY
    d = s.step()
    assert victims(d) == {"c2-2"}


def test_kueue_cant_preempt_in_cluster_queue_for_within_never() -> None:
    """Kueue "can't preempt workloads in ClusterQueue for withinClusterQueue=Never"."""
    quotas = [
        Quota(
            "c2",
            limit=Resources(gpus=4),
            within_tenant_preemption=WithinTenantPreemption.NEVER,
        )
    ]
    s = cluster([8], quotas)
    run(s, "c2", [("n1", [0, 1, 2])], priority=-1, aid="c2-low")
    req = s.submit("c2", Shape.of(4), priority=1)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_kueue_preempt_newer_workloads_with_the_same_priority() -> None:
    """Kueue "preempt newer workloads with the same priority" (LowerOrNewerEqualPriority):
    a newer equal-priority job of the tenant is preempted, an older one is not."""
    quotas = [
        Quota(
            "t",
            limit=Resources(gpus=4),
            within_tenant_preemption=WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY,
        )
    ]
    s = cluster([8], quotas)
    older = s.submit("t", Shape.of(4), priority=2)  # arrived before the running one
    newer = run(s, "t", [("n1", range(4))], priority=2, aid="newer")
    d = s.step()
    assert victims(d) == {newer.id}
    assert admitted(d) == [older.id]


def test_kueue_same_priority_older_is_not_preempted() -> None:
    """Kueue "preempt newer workloads with the same priority", the other half: a running
    job that arrived first is safe from an equal-priority newcomer."""
    quotas = [
        Quota(
            "t",
            limit=Resources(gpus=4),
            within_tenant_preemption=WithinTenantPreemption.LOWER_OR_NEWER_EQUAL_PRIORITY,
        )
    ]
    s = cluster([8], quotas)
    run(s, "t", [("n1", range(4))], priority=2, aid="first")
    req = s.submit("t", Shape.of(4), priority=2)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_kueue_preempting_locally_and_borrowing_same_resource() -> None:
    """Kueue "preempting locally and borrowing same resource in cohort": c1 holds med (0)
    and low (-1); a priority-1 request that fits nowhere else preempts c1-low only."""
    s = cluster([8])
    run(s, "c1", [("n1", range(4))], priority=0, aid="c1-med")
    run(s, "c1", [("n1", range(4, 8))], priority=-1, aid="c1-low")
    req = s.submit("c1", Shape.of(4), priority=1)
    d = s.step()
    assert victims(d) == {"c1-low"}
    assert admitted(d) == [req.id]


def test_kueue_borrow_within_cohort_threshold() -> None:
    """Kueue "use BorrowWithinCohort; allow preempting a lower-priority workload from
    another ClusterQueue while borrowing" and its threshold: a borrowing preemptor takes
    only victims at or below `borrowing_max_priority`, and none with NEVER."""
    base = {"guaranteed": Resources(gpus=0)}
    for policy, expect in (
        (BorrowingPreemption.UP_TO_PRIORITY, {"low"}),
        (BorrowingPreemption.NEVER, set()),
    ):
        quotas = [
            Quota(
                "a",
                preemption_while_borrowing=policy,
                borrowing_max_priority=0,
                **base,  # type: ignore[arg-type]
            )
        ]
        s = cluster([4, 4], quotas)
        run(s, "b", [("n1", range(4))], priority=0, aid="low")
        run(s, "b", [("n2", range(4))], priority=2, age=10, aid="mid")
        s.submit("a", Shape.of(4), priority=5)
        assert victims(s.step()) == expect, policy


# -- KAI Scheduler: pkg/scheduler/actions/reclaim/reclaimGang_test.go ----------------


def test_kai_reclaim_other_job_and_place_all_tasks() -> None:
    """KAI "Reclaim other job and pipeline all tasks of job": queue1 (deserved 2) reclaims
    the 1-GPU job of queue0 (deserved 0) for its 2-task gang on a 2-GPU node."""
    quotas = [Quota("q1", guaranteed=Resources(gpus=2))]
    s = cluster([2], quotas)
    run(s, "q0", [("n1", [0])], priority=50, aid="running")
    req = s.submit("q1", Shape.of(1), 2, priority=10)
    d = s.step()
    assert victims(d) == {"running"}
    assert admitted(d) == [req.id]


def test_kai_no_reclaim_if_the_gang_cannot_fit() -> None:
    """KAI "If can't allocate all tasks, dont' reclaim": a 1-GPU node cannot host the gang."""
    quotas = [Quota("q1", guaranteed=Resources(gpus=2))]
    s = cluster([1], quotas)
    run(s, "q0", [("n1", [0])], priority=50, aid="running")
    req = s.submit("q1", Shape.of(1), 2, priority=10)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_kai_dont_reclaim_if_it_would_go_over_quota() -> None:
    """KAI "dont reclaim if will go over quota": queue1 (deserved 2) asks 2x2: beyond its
    guarantee, and lower priority than the 10-GPU job, so nothing is reclaimed."""
    quotas = [Quota("q1", guaranteed=Resources(gpus=2), weight=2), Quota("q0", weight=1)]
    s = cluster([10], quotas)
    run(s, "q0", [("n1", range(10))], priority=50, aid="running")
    req = s.submit("q1", Shape.of(2), 2, priority=10)
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_kai_job_reclaims_from_job_on_two_nodes() -> None:
    """KAI "job reclaims from job on two nodes": queue0 (deserved 1) runs a 2-task gang
    over both 1-GPU nodes; queue1 (deserved 1) reclaims it whole, though that takes queue0
    below its own deserved share (the gang is what makes it borrow)."""
    quotas = [Quota("q0", guaranteed=Resources(gpus=1)), Quota("q1", guaranteed=Resources(gpus=1))]
    s = cluster([1, 1], quotas)
    run(s, "q0", [("n1", [0]), ("n2", [0])], aid="running-job0")
    req = s.submit("q1", Shape.of(1))
    d = s.step()
    assert victims(d) == {"running-job0"}
    assert admitted(d) == [req.id]


# -- YuniKorn: pkg/scheduler/objects/preemption_test.go ------------------------------


def _yunikorn_tree(child2_guarantee: int) -> list[Quota]:
    return [
        Quota("parent", guaranteed=Resources(gpus=10), limit=Resources(gpus=20)),
        Quota("parent/child1", guaranteed=Resources(gpus=5), limit=Resources(gpus=10)),
        Quota(
            "parent/child2",
            guaranteed=Resources(gpus=child2_guarantee),
            limit=Resources(gpus=10),
        ),
    ]


def test_yunikorn_try_preemption_on_node() -> None:
    """YuniKorn TestTryPreemptionOnNode: child1 (guaranteed 5) holds 5 on each of two full
    5-GPU nodes; child2 (guaranteed 5) asks 5: one victim, not both (the second would take
    child1 below its guarantee), and the newer of the two."""
    s = cluster([5, 5], _yunikorn_tree(5))
    run(s, "parent/child1", [("n1", range(5))], age=2000, aid="alloc1")
    run(s, "parent/child1", [("n2", range(5))], age=1000, aid="alloc2")
    req = s.submit("parent/child2", Shape.of(5))
    d = s.step()
    assert victims(d) == {"alloc2"}
    assert admitted(d) == [req.id]


def test_yunikorn_node_with_capacity_lesser_than_ask() -> None:
    """YuniKorn TestTryPreemption_NodeWithCapacityLesserThanAsk: a 6-GPU ask on 5-GPU
    nodes preempts nobody."""
    s = cluster([5, 5], _yunikorn_tree(6))
    run(s, "parent/child1", [("n1", range(5))], aid="alloc1")
    run(s, "parent/child1", [("n2", range(5))], aid="alloc2")
    req = s.submit("parent/child2", Shape.of(6))
    d = s.step()
    assert victims(d) == set()
    assert req.id in d.pending


def test_yunikorn_over_guaranteed_parent_and_under_guaranteed_preemptor() -> None:
    """YuniKorn TestTryPreemptionOnNodeWithOGParentAndUGPreemptor: parent (guaranteed 2)
    holds 6 through child1 (six 1-GPU jobs); child2 (guaranteed 1) asks 1 and one job of
    child1 is preempted, the newest. (rmgrpc reaches it by fair share, not by guarantee:
    a guarantee counts only while the parent is inside its own.)"""
    quotas = [
        Quota("parent", guaranteed=Resources(gpus=2), limit=Resources(gpus=20)),
        Quota("parent/child2", guaranteed=Resources(gpus=1), limit=Resources(gpus=10)),
    ]
    s = cluster([3, 3], quotas)
    for i in range(1, 7):
        node, gpu = ("n1", (i - 1) // 2) if i % 2 == 0 else ("n2", (i - 1) // 2)
        run(s, "parent/child1", [(node, [gpu])], age=60.0 * i, aid=f"alloc{i}")
    req = s.submit("parent/child2", Shape.of(1))
    d = s.step()
    assert victims(d) == {"alloc1"}
    assert admitted(d) == [req.id]


# -- the policies as stored ------------------------------------------------------------


def test_quota_rows_written_before_the_policies_decode_to_the_defaults() -> None:
    """A stored Quota without the policy fields (an old row) decodes to the safe
    defaults; set ones round-trip."""
    from rmgrpc import codec
    from rmgrpc.v1 import quota_pb2

    old = quota_pb2.Quota(tenant="t", revision=3).SerializeToString()
    q = codec.quota_from_proto(quota_pb2.Quota.FromString(old))
    assert q.within_tenant_preemption == WithinTenantPreemption.LOWER_PRIORITY
    assert q.reclaim_from_others == ReclaimPolicy.ANY
    assert q.preemption_while_borrowing == BorrowingPreemption.ALWAYS
    strict = Quota(
        "t",
        within_tenant_preemption=WithinTenantPreemption.NEVER,
        reclaim_from_others=ReclaimPolicy.LOWER_PRIORITY,
        preemption_while_borrowing=BorrowingPreemption.UP_TO_PRIORITY,
        borrowing_max_priority=-4,
    )
    back = codec.quota_from_proto(codec.quota_to_proto(strict))
    assert (
        back.within_tenant_preemption,
        back.reclaim_from_others,
        back.preemption_while_borrowing,
        back.borrowing_max_priority,
    ) == (
        WithinTenantPreemption.NEVER,
        ReclaimPolicy.LOWER_PRIORITY,
        BorrowingPreemption.UP_TO_PRIORITY,
        -4,
    )


# -- the search's bounds ---------------------------------------------------------------


def test_many_small_victims_fall_back_to_victim_order_and_stay_minimal() -> None:
    """16 one-GPU jobs on a 16-GPU node and a request for 10: too many subsets to try
    them all (C(16, 10) > COMBINATIONS); those tried come in victim order (lowest
    priority, newest), so the best is still the 8 of priority 0 and the 2 newest of
    priority 1, and none is taken that the request does not need."""
    s = cluster([16])
    for i in range(16):
        run(s, "x", [("n1", [i])], priority=i % 2, age=100.0 + i, aid=f"j{i:02d}")
    req = s.submit("y", Shape.of(10), priority=5)
    d = s.step()
    low = [f"j{i:02d}" for i in range(16) if i % 2 == 0]  # all 8 of priority 0
    high_newest = ["j01", "j03"]  # then the two newest of priority 1
    assert victims(d) == set(low + high_newest)
    assert admitted(d) == [req.id]


def test_quota_and_capacity_bound_at_once_take_one_victim() -> None:
    """Bound by its limit and by capacity: one of its own jobs on a full node frees both,
    so the search takes that one rather than one for quota and another for room."""
    s = cluster([4, 4], [Quota("t", limit=Resources(gpus=4))])
    run(s, "t", [("n1", [0, 1])], priority=0, age=500, aid="t-old")
    run(s, "t", [("n1", [2, 3])], priority=0, age=100, aid="t-new")
    run(s, "x", [("n2", range(4))], priority=-1, aid="other-low")
    req = s.submit("t", Shape.of(2), priority=5)
    d = s.step()
    assert victims(d) == {"t-new"}
    assert admitted(d) == [req.id]


def _placed(
    s: Simulator, tenant: str, node: str, gpus: Sequence[int], cpu: int, prio: int, aid: str
) -> Allocation:
    a = s.submit(tenant, Shape.of(len(gpus), cpu_millis=cpu), priority=prio, alloc_id=aid)
    a.state = AllocationState.ALLOCATED
    a.placements = (Placement(node, tuple(gpus)),)
    a.allocate_time = s.now - 1000
    return a


def test_fewest_victims_beat_the_node_with_the_lowest_priority_victim() -> None:
    """n1 has the lowest-priority victim but needs two (one holds its GPUs, the other its
    CPU); n2 needs one of priority 1. Fewest comes first, across nodes."""
    nodes = [make_node(n, 4, cpu_millis=4000) for n in ("n1", "n2")]
    s = Simulator(nodes, (), NO_WAIT)
    _placed(s, "x", "n1", range(4), 0, 0, "gpus-only")
    _placed(s, "x", "n1", (), 4000, 0, "cpu-only")
    _placed(s, "x", "n2", range(4), 4000, 1, "both")
    req = s.submit("y", Shape.of(4, cpu_millis=4000), priority=3)
    d = s.step()
    assert victims(d) == {"both"}
    assert admitted(d) == [req.id]


def test_lowest_highest_priority_among_equal_counts() -> None:
    """Two victims either way: n1's pair has the lowest single priority (0) but also a 2;
    n2's pair is 1 and 1. The set whose highest priority is lowest wins (n2)."""
    nodes = [make_node(n, 4, cpu_millis=4000) for n in ("n1", "n2")]
    s = Simulator(nodes, (), NO_WAIT)
    _placed(s, "x", "n1", range(4), 0, 0, "n1-gpus")
    _placed(s, "x", "n1", (), 4000, 2, "n1-cpu")
    _placed(s, "x", "n2", range(4), 0, 1, "n2-gpus")
    _placed(s, "x", "n2", (), 4000, 1, "n2-cpu")
    req = s.submit("y", Shape.of(4, cpu_millis=4000), priority=3)
    d = s.step()
    assert victims(d) == {"n2-gpus", "n2-cpu"}
    assert admitted(d) == [req.id]


def test_gang_replicas_share_the_victim_tenants_guarantee() -> None:
    """A 2-replica gang by priority: each replica alone could take one of b's jobs, but
    both would take b (guaranteed 1) below its guarantee; the second replica takes the
    older job of c (no guarantee) instead."""
    s = cluster([1, 1, 1], [Quota("b", guaranteed=Resources(gpus=1))])
    run(s, "b", [("n1", [0])], age=100, aid="b-new")
    run(s, "b", [("n2", [0])], age=200, aid="b-old")
    run(s, "c", [("n3", [0])], age=9000, aid="c-oldest")
    req = s.submit("y", Shape.of(1), 2, priority=5)
    d = s.step()
    assert victims(d) == {"b-new", "c-oldest"}
    assert admitted(d) == [req.id]


def test_exact_search_beats_victim_order_for_quota() -> None:
    """Limit-bound: three 1-GPU jobs of priority -1 and one 3-GPU job of priority 0 fill
    the limit of 6; a request for 3 takes the one 3-GPU job (fewest), not the three that
    come first in victim order."""
    s = cluster([8, 8], [Quota("t", limit=Resources(gpus=6))])
    for i in range(3):
        run(s, "t", [("n1", [i])], priority=-1, aid=f"small{i}")
    run(s, "t", [("n1", [3, 4, 5])], priority=0, aid="mid")
    req = s.submit("t", Shape.of(3), priority=1)
    d = s.step()
    assert victims(d) == {"mid"}
    assert admitted(d) == [req.id]


def test_quota_victim_off_the_node_it_will_run_on() -> None:
    """Bound by the parent's limit only: freeing the sibling's job makes quota room, and
    the request then runs on the free node; freeing it would not make room on its own
    node (the rest of that node is held by a higher priority)."""
    quotas = [Quota("org", limit=Resources(gpus=6))]
    s = cluster([8, 8], quotas)
    run(s, "org/ab", [("n1", range(4))], priority=0, aid="sibling")
    run(s, "x", [("n1", range(4, 8))], priority=9, aid="x-high")
    req = s.submit("org/a", Shape.of(6), priority=5)
    d = s.step()
    assert victims(d) == {"sibling"}
    assert admitted(d) == [req.id]
    assert s.get(req.id).placements[0].node_id == "n2"


def test_per_model_limits_steer_the_victims() -> None:
    """No model asked, but the tenant's per-model limit allows only A100: both A100 jobs
    go, though the H100 node is free (the whole request is checked with the models its
    quota allows)."""
    nodes = [make_node("a", 4, "A100"), make_node("h", 4, "H100")]
    quotas = [Quota("t", limit=Resources(gpus_by_model={"H100": 0, "A100": 8}))]
    s = Simulator(nodes, quotas, NO_WAIT)
    run(s, "x", [("a", [0, 1])], priority=0, aid="a1")
    run(s, "x", [("a", [2, 3])], priority=0, aid="a2")
    req = s.submit("t", Shape.of(4), priority=5)
    d = s.step()
    assert victims(d) == {"a1", "a2"}
    assert admitted(d) == [req.id]


def test_reclaim_reason_lists_only_those_above_their_guarantee() -> None:
    """The pending reason of a tenant under its guarantee names each borrower and by
    how much it borrows; a tenant exactly at its guarantee is not one."""
    quotas = [
        Quota("g", guaranteed=Resources(gpus=4)),
        Quota("c", guaranteed=Resources(gpus=2)),
        Quota("d", guaranteed=Resources(gpus=1)),
    ]
    cfg = SchedulerConfig(min_runtime_seconds=600, preemption_grace_seconds=0)
    s = cluster([8, 1], quotas, cfg)
    run(s, "b", [("n1", [0, 1, 2])], age=10, aid="b")
    run(s, "c", [("n1", [3, 4])], age=10, aid="c")
    run(s, "d", [("n1", [5, 6, 7])], age=10, aid="d")
    run(s, "e", [("n2", [0])], age=10, aid="e")
    req = s.submit("g", Shape.of(4))
    reason = s.step().pending[req.id].reason
    assert "waiting to reclaim from borrowers b (3 GPUs), d (2 GPUs), e (1 GPU):" in reason


def test_fair_share_preemption_says_why() -> None:
    """A tenant below its fair share takes from one above its own, and the victim's
    reason says so (KAI-style fair-share reclaim)."""
    s = cluster([8, 8])
    for i in range(8):
        run(s, "a", [("n1", [i])], aid=f"a{i}")
    for i in range(3):
        run(s, "a", [("n2", [i])], aid=f"a{8 + i}")
    for i in range(3, 8):
        run(s, "b", [("n2", [i])], aid=f"b{i}")
    s.submit("b", Shape.of(2))
    d = s.step()
    assert d.preemptions
    assert all(
        "tenant b is below its fair share and tenant a above its own" in p.reason
        for p in d.preemptions
    )


def test_two_victims_of_one_tenant_count_together_against_its_guarantee() -> None:
    """Both nodes need two victims; n1's pair is newer but both are b's (guaranteed 1,
    holding 2): together they would take b below its guarantee, so n2's pair goes."""
    s = cluster([2, 2], [Quota("b", guaranteed=Resources(gpus=1))])
    run(s, "b", [("n1", [0])], age=100, aid="b1")
    run(s, "b", [("n1", [1])], age=110, aid="b2")
    run(s, "c", [("n2", [0])], age=5000, aid="c1")
    run(s, "c", [("n2", [1])], age=5010, aid="c2")
    req = s.submit("y", Shape.of(2), priority=5)
    d = s.step()
    assert victims(d) == {"c1", "c2"}
    assert admitted(d) == [req.id]


def test_past_the_subset_bound_the_greedy_order_still_ends_minimal() -> None:
    """24 candidates on one node and a CPU-only request that needs the two CPU holders
    (last in victim order): C(24, 2) > COMBINATIONS, so the search falls back to taking
    victims in order until it fits, then drops every one not needed: the two remain."""
    s = Simulator([make_node("n1", 22, cpu_millis=10_000)], (), NO_WAIT)
    for i in range(22):
        _placed(s, "x", "n1", [i], 0, 0, f"gpu{i:02d}")
    _placed(s, "x", "n1", (), 5000, 1, "cpu-a")
    _placed(s, "x", "n1", (), 5000, 1, "cpu-b")
    req = s.submit("y", Shape.of(0, cpu_millis=10_000), priority=3)
    d = s.step()
    assert victims(d) == {"cpu-a", "cpu-b"}
    assert admitted(d) == [req.id]


# -- what mutation testing asked for ----------------------------------------------------


def test_a_node_held_for_a_starving_gang_is_not_preempted_into_by_a_later_equal() -> None:
    """The gang (priority 1) can preempt only one of the nodes it needs, so it starves and
    gets nodes held; a later request of its priority may not preempt on a held node."""
    cfg = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=0, starvation_seconds=60)
    s = cluster([4, 4, 4], config=cfg)
    run(s, "x", [("n1", range(4))], priority=0, aid="x-low")
    run(s, "x", [("n2", range(4))], priority=5, aid="x-high2")
    run(s, "x", [("n3", range(4))], priority=5, aid="x-high3")
    gang = s.submit("g", Shape.of(4), 2, priority=1)
    assert victims(s.step()) == set()
    s.advance(61)
    later = s.submit("g", Shape.of(4), priority=1)  # same tenant: queued after the gang
    d = s.step()
    assert "n1" in d.held_nodes[gang.id]
    assert victims(d) == set()
    assert later.id in d.pending


def test_fair_share_respects_priority_and_the_reclaim_policy() -> None:
    """Fair-share reclaim takes only equal or lower priorities, and with the reclaim
    policy LOWER_PRIORITY only strictly lower ones."""
    for a_priority, policy, expect_any in (
        (0, ReclaimPolicy.ANY, True),
        (1, ReclaimPolicy.ANY, False),
        (0, ReclaimPolicy.LOWER_PRIORITY, False),
    ):
        s = cluster([8, 8], [Quota("b", reclaim_from_others=policy)])
        for i in range(8):
            run(s, "a", [("n1", [i])], priority=a_priority, aid=f"a{i}")
        for i in range(3):
            run(s, "a", [("n2", [i])], priority=a_priority, aid=f"a{8 + i}")
        for i in range(3, 8):
            run(s, "b", [("n2", [i])], aid=f"b{i}")
        s.submit("b", Shape.of(2))
        assert bool(s.step().preemptions) == expect_any, (a_priority, policy)


def test_borrowing_policy_does_not_stop_a_guarantee_reclaim() -> None:
    """preemption_while_borrowing NEVER concerns requests that would end above the
    guarantee; one within it still reclaims."""
    quotas = [
        Quota(
            "g",
            guaranteed=Resources(gpus=4),
            preemption_while_borrowing=BorrowingPreemption.NEVER,
        )
    ]
    s = cluster([4], quotas)
    run(s, "b", [("n1", range(4))], aid="borrowed")
    s.submit("g", Shape.of(4))
    assert victims(s.step()) == {"borrowed"}


def test_borrowing_threshold_excludes_higher_victims() -> None:
    """With UP_TO_PRIORITY 0, a borrowing request finds no victim when the only one has
    priority 2; with ALWAYS it preempts it."""
    for policy, expect in (
        (BorrowingPreemption.UP_TO_PRIORITY, set()),
        (BorrowingPreemption.ALWAYS, {"mid"}),
    ):
        s = cluster([4], [Quota("a", preemption_while_borrowing=policy)])
        run(s, "b", [("n1", range(4))], priority=2, aid="mid")
        s.submit("a", Shape.of(4), priority=5)
        assert victims(s.step()) == expect, policy


def test_a_victim_in_its_grace_is_not_chosen_again() -> None:
    """A job already preempted (still in its grace) frees nothing more: a second urgent
    request takes the other job, not the leaving one."""
    s = cluster([4, 4], config=GRACE)
    run(s, "x", [("n1", range(4))], age=100, aid="newer")
    run(s, "x", [("n2", range(4))], age=900, aid="older")
    first = s.submit("y", Shape.of(4), priority=5)
    assert victims(s.step()) == {"newer"}
    s.submit("z", Shape.of(4), priority=9)
    d = s.step()
    assert victims(d) == {"older"}
    assert first.id in d.pending


def test_min_runtime_skips_young_jobs_but_not_the_rest() -> None:
    """A job younger than the minimum runtime is passed over, the older one is taken."""
    cfg = SchedulerConfig(min_runtime_seconds=60, preemption_grace_seconds=0)
    s = cluster([4, 4], config=cfg)
    run(s, "x", [("n1", range(4))], age=10, aid="young")
    run(s, "x", [("n2", range(4))], age=900, aid="old")
    s.submit("y", Shape.of(4), priority=5)
    assert victims(s.step()) == {"old"}


def test_a_gang_victim_frees_the_cpu_of_all_its_replicas_on_a_node() -> None:
    """Two replicas of one victim on the same node each hold 2 CPU: together they free
    the 4 CPU the request needs there."""
    s = Simulator([make_node("n1", 4, cpu_millis=4000)], (), NO_WAIT)
    v = s.submit("x", Shape.of(1, cpu_millis=2000), 2, alloc_id="gang")
    v.state = AllocationState.ALLOCATED
    v.placements = (Placement("n1", (0,)), Placement("n1", (1,)))
    v.allocate_time = s.now - 1000
    req = s.submit("y", Shape.of(1, cpu_millis=4000), priority=5)
    d = s.step()
    assert victims(d) == {"gang"}
    assert admitted(d) == [req.id]
