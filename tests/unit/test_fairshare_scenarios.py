"""Fair-share scenarios translated from established schedulers' test suites.

Each test names its source. Numbers are translated to rmgrpc's words: a Kueue
ClusterQueue or KAI/Volcano queue is a tenant, a cohort or parent queue is a parent
tenant, `nominalQuota`/`deserved` is `guaranteed`, `maxAllowed` is `limit`, and
`lendingLimit` is `lending_limit`. Where rmgrpc differs on purpose the test says so.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from rmgrpc.model import Allocation, AllocationState, Placement, Quota, Resources, Shape
from rmgrpc.scheduler.fairshare import (
    Ledger,
    UsageHistory,
    all_tenant_usage,
    water_fill,
)
from rmgrpc.scheduler.simulate import GIB, Simulator, make_node
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot
from rmgrpc.state import in_subtree

NOW = 1_000_000.0
ONE = Shape.of(1)


def placed(aid: str, tenant: str, gpus: int, cpu: int = 0, start: float = NOW - 600) -> Allocation:
    return Allocation(
        id=aid,
        tenant=tenant,
        count=1,
        shape=Shape.of(gpus, cpu_millis=cpu),
        state=AllocationState.ALLOCATED,
        placements=(Placement("n0", tuple(range(gpus))),),
        allocate_time=start,
        create_time=start,
    )


def ledger(
    allocs: list[Allocation], quotas: list[Quota], gpus: int = 10, cpu: int = 10_000
) -> Ledger:
    node = make_node("n0", gpus, cpu_millis=cpu)
    return Ledger(
        Snapshot(
            now=NOW,
            nodes={"n0": node},
            allocations={a.id: a for a in allocs},
            quotas={q.tenant: q for q in quotas},
        )
    )


def held(sim: Simulator, tenant: str) -> tuple[int, int, int]:
    """(GPUs, CPU millis, GiB) held by the tenant's subtree."""
    g = c = m = 0
    for a in sim.live():
        if in_subtree(a.tenant, tenant):
            g += a.total_gpus
            c += a.count * a.shape.cpu_millis
            m += a.count * a.shape.memory_bytes // GIB
    return g, c, m


class TestIssueNine:
    def test_parent_with_three_busy_children_and_a_sibling_split_evenly(self) -> None:
        """Issue 9, "Flat fair share in a tree": a parent with three busy children and a
        sibling of equal weight end at 4 and 4 GPUs of 8 (flat ordering gave 6 and 2),
        and the children split the parent's 4 as evenly as whole GPUs allow."""
        sim = Simulator([make_node("n0", 8)])
        for _ in range(10):
            for t in ("p/a", "p/b", "p/c", "s"):
                sim.submit(t, ONE)
        sim.step()
        assert sim.held_gpus("p") == 4
        assert sim.held_gpus("s") == 4
        assert sorted(sim.held_gpus(f"p/{c}") for c in "abc") == [1, 1, 2]
        usage = all_tenant_usage(sim.snapshot())
        assert usage["p"].fair_share_resources.gpus == 4
        assert usage["s"].fair_share_resources.gpus == 4

    def test_fair_share_reclaim_corrects_a_tree_already_at_six_and_two(self) -> None:
        """Issue 9: "fair-share reclaim never corrects it because each child's excess is
        under one allocation". p's children hold 2 each (fair 1.33 each), s holds 2 (fair
        4): one pass preempts 2 of p's, s ends at 4, and nothing moves after that."""
        cfg = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=0)
        sim = Simulator([make_node("n0", 8)], config=cfg, now=NOW)
        for i, t in enumerate(("p/a", "p/a", "p/b", "p/b", "p/c", "p/c", "s", "s")):
            a = placed(f"r{i}", t, 1, start=NOW - 100)
            sim.add(replace(a, placements=(Placement("n0", (i,)),)))
        for _ in range(4):
            for t in ("p/a", "p/b", "p/c", "s"):
                sim.submit(t, ONE)
        d = sim.step()
        assert len(d.preemptions) == 2
        assert (sim.held_gpus("p"), sim.held_gpus("s")) == (4, 4)
        assert sorted(sim.held_gpus(f"p/{c}") for c in "abc") == [1, 1, 2]
        for _ in range(2):
            assert not sim.step().preemptions  # stable: no trading back and forth


class TestKueueDominantResourceShare:
    """Kueue pkg/cache/scheduler/fair_sharing_test.go, TestDominantResourceShare: the
    share a ClusterQueue is ordered by is its usage above nominal quota, over the
    cohort's total, divided by its fair-sharing weight (cluster: 10 GPUs, 10 CPU)."""

    @staticmethod
    def quotas(weight: float = 1.0) -> list[Quota]:
        return [
            Quota("test-cohort/cq", guaranteed=Resources(gpus=5, cpu_millis=2000), weight=weight),
            Quota("test-cohort/lending-cq", guaranteed=Resources(gpus=5, cpu_millis=8000)),
        ]

    def test_usage_above_nominal(self) -> None:
        led = ledger([placed("w", "test-cohort/cq", 7, 3000)], self.quotas())
        assert led.order_score("test-cohort/cq") == (0, pytest.approx(0.2))  # (7-5)/10
        # Idle, 5 GPUs and 8 CPU under its guarantee: the larger of -5/10 and -8/10.
        assert led.order_score("test-cohort/lending-cq") == (0, pytest.approx(-0.5))

    def test_one_resource_above_nominal(self) -> None:
        led = ledger([placed("w", "test-cohort/cq", 3, 3000)], self.quotas())
        assert led.order_score("test-cohort/cq") == (0, pytest.approx(0.1))  # CPU (3-2)/10

    def test_above_nominal_with_integer_weight(self) -> None:
        led = ledger([placed("w", "test-cohort/cq", 7)], self.quotas(weight=2))
        assert led.order_score("test-cohort/cq") == (0, pytest.approx(0.1))

    def test_above_nominal_with_decimal_weight(self) -> None:
        led = ledger([placed("w", "test-cohort/cq", 7)], self.quotas(weight=0.5))
        assert led.order_score("test-cohort/cq") == (0, pytest.approx(0.4))

    def test_above_nominal_with_zero_weight(self) -> None:
        """Kueue gives weight 0 an infinite share; rmgrpc sorts it after every weighted
        sibling (tier 1) and keeps the share to order weight-0 siblings among themselves."""
        led = ledger([placed("w", "test-cohort/cq", 7)], self.quotas(weight=0))
        assert led.order_score("test-cohort/cq") == (1, pytest.approx(0.2))
        assert led.order_score("test-cohort/cq") > led.order_score("test-cohort/lending-cq")

    def test_usage_below_nominal(self) -> None:
        """Differs on purpose: Kueue clamps a queue under its nominal quota to 0; rmgrpc
        keeps how far below the guarantee it is (negative), so the most-deprived of two
        tenants under their guarantees goes first instead of falling back to arrival."""
        led = ledger([placed("w", "test-cohort/cq", 2, 1000)], self.quotas())
        score = led.order_score("test-cohort/cq")[1]
        assert score < 0
        assert score == pytest.approx(-0.1)  # CPU (1-2)/10 is the larger of the two


class TestKaiResourceDivision:
    """KAI Scheduler pkg/scheduler/plugins/proportion/resource_division/
    resource_division_test.go, "two queues": deserved 2 GPUs each, over-quota weight 2,
    request 6 each. rmgrpc's fair share (GetUsage) and the queue agree on the split."""

    @staticmethod
    def run(total: int, w1: float = 2, w2: float = 2, limit1: int | None = None) -> Simulator:
        quotas = [
            Quota("q1", guaranteed=Resources(gpus=2), limit=Resources(gpus=limit1), weight=w1),
            Quota("q2", guaranteed=Resources(gpus=2), weight=w2),
        ]
        sim = Simulator([make_node("n0", total)], quotas)
        for _ in range(6):
            sim.submit("q1", ONE)
            sim.submit("q2", ONE)
        return sim

    @pytest.mark.parametrize(
        ("entry", "total", "w1", "w2", "limit1", "expected"),
        [
            ("allocates many available gpus", 15, 2, 2, None, (6, 6)),
            ("allocates exact requested amount gpus", 12, 2, 2, None, (6, 6)),
            ("allocates GPUs proportionally", 8, 1, 3, None, (3, 5)),
            ("doesn't allocate more than allowed", 12, 2, 2, 5, (5, 6)),
        ],
    )
    def test_two_queues(
        self,
        entry: str,
        total: int,
        w1: float,
        w2: float,
        limit1: int | None,
        expected: tuple[int, int],
    ) -> None:
        sim = self.run(total, w1, w2, limit1)
        usage = all_tenant_usage(sim.snapshot())
        fair = (usage["q1"].fair_share_resources.gpus, usage["q2"].fair_share_resources.gpus)
        assert fair == expected, entry
        sim.step()
        assert (sim.held_gpus("q1"), sim.held_gpus("q2")) == expected, entry

    def test_zero_over_quota_weight_gets_only_leftovers(self) -> None:
        """KAI "doesn't give when over quota weight is zero" leaves the rest undivided;
        rmgrpc differs on purpose: weight 0 takes what weighted siblings leave (their
        demand met), so idle GPUs are never stranded. Here q2 wants 6 of 10: q1 (weight
        0) gets its guarantee of 2 plus the 2 nobody else wants."""
        got = water_fill(10, [("q1", 2, 6, 0.0), ("q2", 2, 6, 2.0)])
        assert got == pytest.approx({"q1": 4, "q2": 6})
        sim = self.run(10, w1=0)
        sim.step()
        assert (sim.held_gpus("q1"), sim.held_gpus("q2")) == (4, 6)


class TestVolcanoHdrf:
    """Volcano pkg/scheduler/plugins/drf/hdrf_test.go, TestHDRF: hierarchical DRF over
    CPU and memory (no GPUs); weights per level from the hierarchy annotation."""

    def test_rescaling(self) -> None:
        """ "rescaling test": root/sci (1 CPU + 1G tasks) against root/eng, whose children
        dev (CPU only) and prod (memory only) each use one resource: eng's dominant share
        counts both, so sci and eng split the node evenly."""
        sim = Simulator([make_node("n", 0, cpu_millis=10_000, memory_bytes=10 * GIB)])
        for _ in range(10):
            sim.submit("root/sci", Shape.of(0, cpu_millis=1000, memory_bytes=GIB))
            sim.submit("root/eng/dev", Shape.of(0, cpu_millis=1000))
            sim.submit("root/eng/prod", Shape.of(0, memory_bytes=GIB))
        sim.step()
        assert held(sim, "root/sci") == (0, 5000, 5)
        assert held(sim, "root/eng/dev") == (0, 5000, 0)
        assert held(sim, "root/eng/prod") == (0, 0, 5)

    def test_blocking_nodes(self) -> None:
        """ "blocking nodes test": once CPU is gone, CPU-only tenants stop and the
        memory-only ones (one a grandchild) share the memory left."""
        quotas = [Quota("root/pg3/pg31", weight=2), Quota("root/pg3/pg32", weight=2)]
        sim = Simulator([make_node("n", 0, cpu_millis=30_000, memory_bytes=30 * GIB)], quotas)
        for _ in range(30):
            for t in ("root/pg1", "root/pg2", "root/pg3/pg31"):
                sim.submit(t, Shape.of(0, cpu_millis=1000))
            for t in ("root/pg3/pg32", "root/pg4"):
                sim.submit(t, Shape.of(0, memory_bytes=GIB))
        sim.step()
        assert held(sim, "root/pg1") == (0, 10_000, 0)
        assert held(sim, "root/pg2") == (0, 10_000, 0)
        assert held(sim, "root/pg3/pg31") == (0, 10_000, 0)
        assert held(sim, "root/pg3/pg32") == (0, 0, 15)
        assert held(sim, "root/pg4") == (0, 0, 15)


class TestLendingLimit:
    """Kueue's lendingLimit (ClusterQueue resource quota, KEP-1224): only that much of an
    idle nominal quota is lent to the cohort. Kueue's own tests exercise it through the
    cohort's available quota; this is the same rule on one node."""

    def test_idle_guarantee_beyond_the_lending_limit_stays_free(self) -> None:
        quotas = [Quota("a", guaranteed=Resources(gpus=4), lending_limit=Resources(gpus=1))]
        sim = Simulator([make_node("n0", 8)], quotas)
        flood = [sim.submit("b", ONE) for _ in range(8)]
        sim.step()
        assert sim.held_gpus("b") == 5  # 8 minus the 3 GPUs of a's guarantee it keeps
        reason = sim.get(flood[-1].id).pending_reason
        assert "kept idle for the guarantee of a" in reason
        # The owner comes back: its kept capacity is there at once, no preemption.
        for _ in range(3):
            sim.submit("a", ONE)
        d = sim.step()
        assert sim.held_gpus("a") == 3 and not d.preemptions
        usage = all_tenant_usage(sim.snapshot())
        assert usage["a"].lending_limit.gpus == 1

    def test_no_lending_limit_lends_everything(self) -> None:
        sim = Simulator([make_node("n0", 8)], [Quota("a", guaranteed=Resources(gpus=4))])
        for _ in range(8):
            sim.submit("b", ONE)
        sim.step()
        assert sim.held_gpus("b") == 8


class TestDecay:
    """Slurm's PriorityDecayHalfLife (slurm.conf; priority/multifactor's decayed usage):
    usage counts less the longer ago it was; with the half-life at 0 it does not count."""

    HALF = 3600.0

    def snapshot(self, history: UsageHistory, now: float, running: list[Allocation]) -> Snapshot:
        return Snapshot(
            now=now,
            nodes={"n0": make_node("n0", 8)},
            allocations={a.id: a for a in running},
            quotas={},
            config=SchedulerConfig(fair_share_half_life_seconds=self.HALF),
            ended_usage=history.values(now),
        )

    def test_order_recovers_on_the_half_life(self) -> None:
        """a held 8 GPUs for one half-life and stopped: its recent usage is then 4 GPUs
        and halves every half-life; b holds 2 GPUs now. a goes after b, ties one
        half-life later, and goes first after two."""
        history = UsageHistory(self.HALF)
        history.ended("a", (8, 0, 0), NOW - self.HALF, NOW)
        b = placed("b1", "b", 2, start=NOW - 60)
        scores = []
        for k in range(3):
            led = Ledger(self.snapshot(history, NOW + k * self.HALF, [b]))
            assert led.recent_of("a")[0] == pytest.approx(4 / 2**k)
            scores.append((led.order_key("a"), led.order_key("b")))
        assert scores[0][0] > scores[0][1]
        assert scores[1][0][0][1] == pytest.approx(scores[1][1][0][1])
        assert scores[2][0] < scores[2][1]

    def test_idle_tenant_gets_its_turn_after_a_burst(self) -> None:
        """Right after a's burst ends, b (idle so far) is served first under flood;
        with decay off a and b alternate from the start."""
        history = UsageHistory(self.HALF)
        history.ended("a", (8, 0, 0), NOW - 2 * self.HALF, NOW)
        for half_life, first in ((self.HALF, "b"), (0.0, "a")):
            config = SchedulerConfig(fair_share_half_life_seconds=half_life)
            sim = Simulator([make_node("n0", 1)], config=config, now=NOW)
            sim.submit("a", ONE)
            sim.submit("b", ONE)
            snap = sim.snapshot()
            from dataclasses import replace

            from rmgrpc.scheduler.cycle import run_cycle

            d = run_cycle(replace(snap, ended_usage=history.values(NOW)))
            assert [sim.get(x.allocation_id).tenant for x in d.admissions] == [first]

    def test_running_work_counts_as_it_is_held(self) -> None:
        """Recent usage of work still running grows toward what it holds (half of it
        after one half-life); the order uses the larger of held and recent, so a tenant
        that just started holding is not treated as idle."""
        history = UsageHistory(self.HALF)
        a = placed("a1", "a", 8, start=NOW - self.HALF)
        led = Ledger(self.snapshot(history, NOW, [a]))
        assert led.recent_of("a")[0] == pytest.approx(4)
        assert led.order_usage("a")[0] == 8

    def test_out_of_order_ends_add_up(self) -> None:
        """Intervals reported in any order give the same recent usage."""
        one, two = UsageHistory(self.HALF), UsageHistory(self.HALF)
        one.ended("a", (2, 0, 0), NOW - 500, NOW - 100)
        one.ended("a", (4, 0, 0), NOW - 900, NOW - 300)
        two.ended("a", (4, 0, 0), NOW - 900, NOW - 300)
        two.ended("a", (2, 0, 0), NOW - 500, NOW - 100)
        assert one.values(NOW)["a"] == pytest.approx(two.values(NOW)["a"])
