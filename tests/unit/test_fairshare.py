"""Fair share: water-filling, the tenant tree, quota checks, usage numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from rmgrpc.model import (
    Allocation,
    AllocationState,
    Placement,
    Quota,
    Resources,
    Shape,
)
from rmgrpc.scheduler.fairshare import (
    Amount,
    Ledger,
    TenantTree,
    all_tenant_usage,
    check_admissible,
    tenant_usage,
    water_fill,
)
from rmgrpc.scheduler.simulate import make_node
from rmgrpc.scheduler.snapshot import SchedulerConfig, Snapshot

NOW = 10_000.0


def running(aid: str, tenant: str, node: str, gpus: tuple[int, ...], **kw: object) -> Allocation:
    return Allocation(
        id=aid,
        tenant=tenant,
        count=1,
        shape=Shape.of(len(gpus), cpu_millis=1000),
        state=AllocationState.ALLOCATED,
        placements=(Placement(node, gpus),),
        allocate_time=NOW - 100,
        **kw,  # type: ignore[arg-type]
    )


def pending(aid: str, tenant: str, gpus: int = 1, count: int = 1, **kw: object) -> Allocation:
    return Allocation(
        id=aid,
        tenant=tenant,
        count=count,
        shape=Shape.of(gpus, cpu_millis=1000),
        **kw,  # type: ignore[arg-type]
    )


def snap(
    allocs: list[Allocation],
    quotas: Sequence[Quota] = (),
    nodes: int = 2,
    **cfg: Any,
) -> Snapshot:
    ns = [make_node(f"n{i}") for i in range(nodes)]
    return Snapshot(
        now=NOW,
        nodes={n.id: n for n in ns},
        allocations={a.id: a for a in allocs},
        quotas={q.tenant: q for q in quotas},
        config=SchedulerConfig(**cfg),
    )


class TestWaterFill:
    def test_equal_weights_split_evenly(self) -> None:
        got = water_fill(16, [("a", 0, 100, 1), ("b", 0, 100, 1)])
        assert got == pytest.approx({"a": 8, "b": 8})

    def test_weights_three_to_one(self) -> None:
        got = water_fill(16, [("a", 0, 100, 3), ("b", 0, 100, 1)])
        assert got == pytest.approx({"a": 12, "b": 4})

    def test_capped_demand_gives_its_rest_to_others(self) -> None:
        got = water_fill(16, [("a", 0, 2, 1), ("b", 0, 100, 1), ("c", 0, 100, 2)])
        assert got == pytest.approx({"a": 2, "b": 14 / 3, "c": 28 / 3})

    def test_guarantees_come_first(self) -> None:
        got = water_fill(16, [("a", 10, 100, 1), ("b", 0, 100, 1)])
        assert got == pytest.approx({"a": 13, "b": 3})

    def test_oversubscribed_guarantees_scale_down(self) -> None:
        got = water_fill(10, [("a", 10, 100, 1), ("b", 10, 100, 1)])
        assert got == pytest.approx({"a": 5, "b": 5})

    def test_no_demand_gets_nothing(self) -> None:
        assert water_fill(16, [("a", 4, 0, 1), ("b", 0, 100, 1)]) == pytest.approx(
            {"a": 0, "b": 16}
        )


class TestTree:
    def test_parents_from_names_and_explicit_parent(self) -> None:
        tree = TenantTree(
            {"x": Quota("x", parent="org")}, ["org/a/b", "x", "solo"], SchedulerConfig()
        )
        assert tree.chain("org/a/b") == ("org/a/b", "org/a", "org")
        assert tree.chain("x") == ("x", "org")
        assert tree.children["org"] == ["org/a", "x"]
        assert tree.roots == ["org", "solo"]

    def test_parent_loops_are_cut(self) -> None:
        tree = TenantTree(
            {"a": Quota("a", parent="b"), "b": Quota("b", parent="a")}, [], SchedulerConfig()
        )
        assert len(tree.chain("a")) <= 2

    def test_defaults_for_tenants_without_quota(self) -> None:
        cfg = SchedulerConfig(default_limit=Resources(gpus=4), default_weight=2.0)
        tree = TenantTree({}, ["t"], cfg)
        assert tree.limit("t").gpus == 4
        assert tree.weight("t") == 2.0
        assert tree.guaranteed("t").gpus is None


class TestLedger:
    def test_limits_of_tenant_and_parent(self) -> None:
        s = snap(
            [running("r1", "org/a", "n0", tuple(range(6))), running("r2", "org/b", "n1", (0, 1))],
            [Quota("org", limit=Resources(gpus=10)), Quota("org/a", limit=Resources(gpus=8))],
        )
        led = Ledger(s)
        block = led.limit_block("org/a", Amount(3))
        assert block is not None and block.tenant == "org/a"
        assert block.text() == "over quota of tenant org/a: holds 6 of limit 8 GPUs, asks 3 GPUs"
        block = led.limit_block("org/b", Amount(3))
        assert block is not None and block.tenant == "org"
        assert block.text().startswith("parent quota `org` full: its subtree holds 8 of limit 10")
        assert led.limit_block("org/b", Amount(2)) is None

    def test_per_model_limits(self) -> None:
        s = snap(
            [running("r1", "t", "n0", (0, 1))],
            [Quota("t", limit=Resources(gpus_by_model={"H100": 3}))],
        )
        led = Ledger(s)
        assert led.limit_block("t", Amount(2, models={"H100": 2})) is not None
        assert led.limit_block("t", Amount(1, models={"H100": 1})) is None
        assert led.allowed_models("t", 2, ["A100", "H100"]) == ("A100",)
        assert led.allowed_models("u", 2, ["A100", "H100"]) is None

    def test_within_guarantee_and_borrowing(self) -> None:
        s = snap(
            [running("r1", "a", "n0", (0, 1, 2))],
            [Quota("a", guaranteed=Resources(gpus=4)), Quota("b")],
        )
        led = Ledger(s)
        assert led.within_guarantee("a", Amount(1, 1000))
        assert not led.within_guarantee("a", Amount(2, 1000))
        assert not led.within_guarantee("b", Amount(1))  # no guarantee at all

    def test_preempted_in_grace_is_held_but_leaving(self) -> None:
        gone = running("r1", "a", "n0", (0, 1))
        gone.state = AllocationState.PREEMPTED
        gone.grace_end_time = NOW + 10
        led = Ledger(snap([gone]))
        assert led.held_of("a").gpus == 2
        assert led.effective("a").gpus == 0

    def test_fair_shares_and_contention(self) -> None:
        allocs = [running(f"r{i}", "a", "n0" if i < 8 else "n1", (i % 8,)) for i in range(16)]
        allocs += [pending(f"p{i}", "b") for i in range(20)]
        led = Ledger(snap(allocs, [Quota("a", weight=3), Quota("b", weight=1)]))
        assert led.fair["a"][0] == pytest.approx(12)
        assert led.fair["b"][0] == pytest.approx(4)
        assert led.contended == (True, False, False)
        assert led.below_fair_share("b", Amount(1, 1000))
        assert not led.below_fair_share("a", Amount(1, 1000))

    def test_hierarchical_fair_share(self) -> None:
        allocs = [pending(f"p{i}", t) for i, t in enumerate(["org/x", "org/y", "lab"] * 20)]
        led = Ledger(snap(allocs))
        assert led.fair["org"][0] == pytest.approx(8)
        assert led.fair["lab"][0] == pytest.approx(8)
        assert led.fair["org/x"][0] == pytest.approx(4)
        assert led.fair["org/y"][0] == pytest.approx(4)


class TestUsage:
    def test_usage_of_a_subtree(self) -> None:
        s = snap(
            [
                running("r1", "org/a", "n0", (0, 1, 2, 3, 4, 5)),
                running("r2", "org/b", "n1", (0, 1)),
                pending("p1", "org/b", 4),
                pending("p2", "lab", 8),
            ],
            [
                Quota("org", guaranteed=Resources(gpus=4), limit=Resources(gpus=12), weight=2),
            ],
        )
        u = tenant_usage(s, "org")
        assert u.held.gpus == 8
        assert u.pending.gpus == 4
        assert u.guaranteed.gpus == 4
        assert u.limit.gpus == 12
        assert u.borrowed.gpus == 4
        assert u.running == 2 and u.pending_count == 1
        assert u.dominant_share == pytest.approx(8 / 16)
        assert u.weighted_dominant_share == pytest.approx(8 / 16 / 2)
        assert u.weight == 2
        # Guarantee 4 first, then the other 12 split 2:1 with lab: 4 + 8 = 12 (its demand).
        assert u.fair_share_resources.gpus == 12
        assert u.fair_share == pytest.approx(12 / 16)
        assert tenant_usage(s, "lab").fair_share_resources.gpus == 4
        b = tenant_usage(s, "org/b")
        assert b.held.gpus == 2 and b.pending.gpus == 4
        assert tenant_usage(s, "nobody").held.gpus == 0
        assert set(all_tenant_usage(s)) == {"org", "org/a", "org/b", "lab"}


class TestAdmissible:
    def test_over_own_and_parent_limit(self) -> None:
        s = snap(
            [],
            [Quota("org", limit=Resources(gpus=16)), Quota("org/a", limit=Resources(gpus=8))],
        )
        assert check_admissible(s, pending("x", "org/a", 8)) is None
        reason = check_admissible(s, pending("x", "org/a", 4, count=3))
        assert reason == "request needs 12 GPUs in total but tenant org/a allows at most 8 GPUs"
        reason = check_admissible(s, pending("x", "org/b", 8, count=3))
        assert reason is not None and "parent quota `org`" in reason

    def test_cpu_memory_and_model_limits(self) -> None:
        s = snap(
            [],
            [Quota("t", limit=Resources(cpu_millis=4000, gpus_by_model={"H100": 2}))],
        )
        assert check_admissible(s, pending("x", "t", 1, count=5)) is not None  # 5 CPU
        req = Allocation(id="y", tenant="t", count=1, shape=Shape.of(3, "H100"))
        assert "H100" in (check_admissible(s, req) or "")
        # No model named and every model in the cluster is limited below the ask.
        req = Allocation(id="z", tenant="t", count=1, shape=Shape.of(3))
        assert check_admissible(s, req) is not None
        assert (
            check_admissible(s, Allocation(id="w", tenant="t", count=1, shape=Shape.of(2))) is None
        )

    def test_default_limit_applies(self) -> None:
        s = snap([], [], default_limit=Resources(gpus=2))
        assert check_admissible(s, pending("x", "anyone", 3)) is not None
