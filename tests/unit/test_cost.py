"""Cost and budgets: the price arithmetic, accrual through the engine's txns on a fake
clock, roll-up to parents, budget refusal and alerts, and accrual across restarts."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rmgrpc import cost
from rmgrpc.clock import ManualClock
from rmgrpc.config import ConfigError, load_settings
from rmgrpc.engine import Engine
from rmgrpc.errors import QuotaExceeded
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationState, Budget, EventKind, Quota, Shape
from rmgrpc.store import Store, StoreError, Write
from tests.conftest import make_settings

GIB = 1024**3
PRICES = {"gpu_hour_prices": "H100=4.0,A100=2.0", "gpu_hour_price_default": 1.0}
START = 1_800_000_000.0  # ManualClock's start: 2027-01-15 08:00 UTC


# -- arithmetic ----------------------------------------------------------------------------


def test_a_price_table_prices_each_resource_per_hour() -> None:
    prices = cost.PriceTable({"H100": 4.0}, 1.5, 0.04, 0.005)
    h = cost.hourly(cost.Held("H100", gpus=2, cpu_millis=8000, memory_bytes=64 * GIB), prices)
    assert h.cost == pytest.approx(2 * 4.0 + 8 * 0.04 + 64 * 0.005)
    assert (h.gpu_hours, h.cpu_core_hours, h.memory_gib_hours) == (2.0, 8.0, 64.0)
    assert cost.hourly(cost.Held("L4", gpus=1), prices).cost == 1.5  # not listed: default


@given(
    st.floats(0, 1e6),
    st.floats(0, 3e5),
    st.sampled_from([0, 60, 3600, 86400, 7 * 86400]),
)
def test_split_covers_the_interval_exactly_once(start: float, length: float, period: int) -> None:
    pieces = list(cost.split(start, start + length, period))
    assert sum(s for _, s in pieces) == pytest.approx(length, abs=1e-6)
    for p, s in pieces:
        assert s > 0 and (period == 0 or (p >= 0 and s <= period + 1e-6))
    assert [p for p, _ in pieces] == sorted({p for p, _ in pieces})


@given(st.floats(0, 2e5), st.floats(0, 2e5), st.integers(0, 8))
def test_accrual_is_additive_over_adjacent_intervals(a: float, b: float, gpus: int) -> None:
    prices = cost.PriceTable({}, 2.0, 0.04, 0.005)
    held = [cost.Held("H100", gpus, 1000 * gpus, GIB * gpus)]
    t0 = START
    whole = sum(r.cost for r in cost.accrue(held, prices, t0, t0 + a + b).values())
    parts = sum(r.cost for r in cost.accrue(held, prices, t0, t0 + a).values())
    parts += sum(r.cost for r in cost.accrue(held, prices, t0 + a, t0 + a + b).values())
    assert whole == pytest.approx(parts, rel=1e-9, abs=1e-9)


def test_alerts_fire_once_per_threshold() -> None:
    assert cost.alerts_due(49.9, 100, 0) == []
    assert cost.alerts_due(80, 100, 0) == [50, 75]
    assert cost.alerts_due(80, 100, 75) == []
    assert cost.alerts_due(100, 100, 75) == [90, 100]
    assert cost.alerts_due(1000, 0, 0) == []  # no budget
    assert cost.reached(80, 100, 100) == 75  # raised from 80 to 100: 90 and 100 re-armed
    assert cost.reached(80, 100, 50) == 50


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cpu_core_hour_price": -1.0}, "cpu_core_hour_price must be a finite number >= 0"),
        ({"memory_gib_hour_price": math.nan}, "memory_gib_hour_price must be a finite"),
        ({"gpu_hour_price_default": math.inf}, "gpu_hour_price_default must be a finite"),
        ({"gpu_hour_prices": "H100=-2"}, "price of H100 must be a finite number >= 0"),
        ({"gpu_hour_prices": "H100=nan"}, "price of H100 must be a finite"),
        ({"gpu_hour_prices": "H100"}, "'H100' is not MODEL=PRICE"),
        ({"gpu_hour_prices": "H100=1,H100=2"}, "priced twice"),
        ({"cost_accrual_interval_seconds": 0.0}, "cost_accrual_interval_seconds must be > 0"),
    ],
)
def test_bad_prices_are_refused_at_start(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env={}, overrides=overrides)


def test_unknown_cost_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[cost]\ngpu_hour_price_default = 1.0\ngpu_hour_pricez = 'H100=1'\n")
    with pytest.raises(ConfigError, match=r"unknown setting \[cost\] gpu_hour_pricez"):
        load_settings(str(path), env={})
    path.write_text("[cost]\ngpu_hour_prices = 'H100=4.5'\ncpu_core_hour_price = 0.1\n")
    table = load_settings(str(path), env={}).price_table()
    assert table.gpu_hour("H100") == 4.5 and table.cpu_core_hour == 0.1


# -- the engine ----------------------------------------------------------------------------


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[Engine, Store]] = []

    async def make(
        clock: ManualClock | None = None, db: str = ":memory:", **overrides: Any
    ) -> tuple[Engine, ManualClock]:
        clock = clock or ManualClock()
        settings = make_settings(tmp_path, db=db, **{**PRICES, **overrides})
        store = await Store.open(db)
        engine = Engine(settings, store, clock)
        await engine.start(simulated_nodes(2, 8, now=clock.now()))
        made.append((engine, store))
        return engine, clock

    yield make
    for engine, store in made:
        await engine.stop()
        await store.close()


def request(tenant: str, gpus: int = 2, **kw: Any) -> Allocation:
    shape = Shape(gpus=gpus, cpu_millis=kw.pop("cpu_millis", 0), memory_bytes=kw.pop("mem", 0))
    return Allocation(id="", tenant=tenant, count=kw.pop("count", 1), shape=shape, **kw)


def spent(engine: Engine, tenant: str = "", model: str = "") -> float:
    return sum(
        row.cost
        for (t, m, _), row in engine.cost.ledger.items()
        if (not tenant or t == tenant) and (not model or m == model)
    )


async def test_two_gpus_for_90_minutes_cost_the_price_tables_arithmetic(engines: Any) -> None:
    engine, clock = await engines(cpu_core_hour_price=0.05, memory_gib_hour_price=0.01)
    a, _ = await engine.allocate(
        request("org/a", gpus=2, cpu_millis=4000, mem=16 * GIB), dry_run=False
    )
    assert a.state == AllocationState.ALLOCATED
    clock.advance(60 * 60)
    await engine.committer.wait(engine.cost.tick())
    clock.advance(30 * 60)
    await engine.release(a.id)  # the last half hour is charged with the release
    expected = 1.5 * (2 * 4.0 + 4 * 0.05 + 16 * 0.01)
    assert spent(engine, "org/a", "H100") == pytest.approx(expected)
    ((_, _, day),) = [k for k in engine.cost.ledger if k[0] == "org/a"]
    assert day == cost.period_start(START, 86400)
    clock.advance(3600)
    await engine.committer.wait(engine.cost.tick())  # ended: nothing more
    assert spent(engine, "org/a") == pytest.approx(expected)
    row = engine.cost.ledger[("org/a", "H100", day)]
    assert (row.gpu_hours, row.cpu_core_hours) == (pytest.approx(3.0), pytest.approx(6.0))


async def test_spend_rolls_up_to_parents(engines: Any) -> None:
    engine, clock = await engines()
    await engine.set_quota(Quota("org", budget=Budget(1000.0, 86400)))
    await engine.allocate(request("org/a", gpus=1), dry_run=False)
    await engine.allocate(request("org/b", gpus=2), dry_run=False)
    clock.advance(3600)
    await engine.committer.wait(engine.cost.tick())
    now = clock.now()
    assert engine.cost.usage("org/a", now) == (pytest.approx(4.0), 0.0)
    assert engine.cost.usage("org/b", now) == (pytest.approx(8.0), 0.0)
    total, fraction = engine.cost.usage("org", now)
    assert total == pytest.approx(12.0) and fraction == pytest.approx(0.012)


async def test_a_budget_refuses_what_it_cannot_cover_with_a_quota_failure(engines: Any) -> None:
    engine, clock = await engines()
    # 2 H100 cost 8 an hour: 10 covers one hour, not two.
    await engine.set_quota(Quota("org/a", budget=Budget(10.0, 86400)))
    ok, _ = await engine.allocate(
        request("org/a", gpus=2, max_duration_seconds=3600), dry_run=False
    )
    with pytest.raises(QuotaExceeded) as refused:
        await engine.allocate(request("org/a", gpus=2, max_duration_seconds=7200), dry_run=False)
    (violation,) = refused.value.violations
    assert violation.subject == "budget:org/a" and "cannot cover" in violation.description
    # No max duration: admitted until the budget is spent, then refused.
    await engine.allocate(request("org/a", gpus=1), dry_run=False)
    clock.advance(2 * 3600)
    await engine.committer.wait(engine.cost.tick())
    with pytest.raises(QuotaExceeded, match="budget of 'org/a' is spent"):
        await engine.allocate(request("org/a", gpus=0, cpu_millis=1000), dry_run=False)
    # Running work is not killed at 100 %.
    assert ok.state == AllocationState.ALLOCATED
    # The next period starts afresh.
    clock.advance(86400)
    await engine.allocate(request("org/a", gpus=0, cpu_millis=1000), dry_run=False)


async def test_the_four_alerts_fire_once_each_per_period(engines: Any) -> None:
    engine, clock = await engines()
    seen: list[tuple[str, int]] = []
    engine.cost.alert_observers.append(lambda a: seen.append((a.tenant, a.percent)))
    await engine.set_quota(Quota("org", budget=Budget(100.0, 0)))
    await engine.allocate(request("org/a", gpus=1), dry_run=False)  # 4 an hour
    start_rev = engine.revision
    for _ in range(40):  # 40 hours: 160 % of the budget
        clock.advance(3600)
        await engine.committer.wait(engine.cost.tick())
    assert seen == [("org", 50), ("org", 75), ("org", 90), ("org", 100)]
    events = await engine.store.read_events(start_rev, 1000)
    budget = [(e.object_id, e.type) for e in events if e.kind == EventKind.BUDGET]
    assert budget == seen


async def test_alerts_already_sent_are_not_sent_again_after_a_restart(
    engines: Any, tmp_path: Path
) -> None:
    """An alert is durable with its event: a restarted server goes on from the highest
    threshold already crossed this period."""
    db = str(tmp_path / "alerts.db")
    clock = ManualClock()
    engine, _ = await engines(clock, db=db)
    await engine.set_quota(Quota("org", budget=Budget(100.0, 0)))
    await engine.allocate(request("org/a", gpus=1), dry_run=False)  # 4 an hour
    for _ in range(20):  # 80 %: the 50 and 75 % alerts
        clock.advance(3600)
        await engine.committer.wait(engine.cost.tick())
    await engine.stop()
    await engine.store.close()

    again, _ = await engines(clock, db=db)
    seen: list[int] = []
    again.cost.alert_observers.append(lambda a: seen.append(a.percent))
    start_rev = again.revision
    for _ in range(6):  # 104 %
        clock.advance(3600)
        await again.committer.wait(again.cost.tick())
    assert seen == [90, 100]
    events = await again.store.read_events(start_rev, 1000)
    assert [e.type for e in events if e.kind == EventKind.BUDGET] == [90, 100]


async def test_accrual_survives_a_restart_and_a_crash(engines: Any, tmp_path: Path) -> None:
    db = str(tmp_path / "cost.db")
    clock = ManualClock()
    engine, _ = await engines(clock, db=db)
    a, _ = await engine.allocate(request("t", gpus=1), dry_run=False)
    clock.advance(3600)
    await engine.committer.wait(engine.cost.tick())
    clock.advance(1800)  # not ticked: what a kill -9 now loses, at most one interval
    await engine.stop()
    await engine.store.close()

    again, _ = await engines(clock, db=db)
    assert spent(again, "t") == pytest.approx(4.0)
    assert again.cost.accrued_through == START + 3600
    await again.committer.wait(again.cost.tick())
    # The new tick charges from the stored watermark: the half hour is not lost after all.
    assert spent(again, "t") == pytest.approx(6.0)
    await again.release(a.id)
    assert spent(again, "t") == pytest.approx(6.0)


async def test_a_preempted_allocation_is_charged_through_its_grace(engines: Any) -> None:
    engine, clock = await engines()
    a, _ = await engine.allocate(request("t", gpus=1), dry_run=False)
    clock.advance(1800)
    with engine.committer.transaction() as txn:
        engine.transitions.preempt(txn, a, 900.0, "make room")
    await engine.committer.wait(txn)
    assert a.state == AllocationState.PREEMPTED
    assert spent(engine, "t") == pytest.approx(4.0 * 2700 / 3600)  # 30 min + 15 min grace
    clock.advance(3600)
    engine.fire_timers()  # the grace ends: nothing more
    await engine.committer.wait(engine.cost.tick())
    await engine.release(a.id)
    assert spent(engine, "t") == pytest.approx(3.0)


async def test_work_is_charged_up_to_its_hard_end_only(engines: Any) -> None:
    engine, clock = await engines()
    await engine.allocate(request("t", gpus=1, max_duration_seconds=600), dry_run=False)
    clock.advance(3600)  # the expiry timer has not fired yet
    await engine.committer.wait(engine.cost.tick())
    assert spent(engine, "t") == pytest.approx(4.0 / 6)
    engine.fire_timers()
    await engine.committer.wait(engine.cost.tick())
    assert spent(engine, "t") == pytest.approx(4.0 / 6)


async def test_a_spent_budget_stops_running_work_only_when_it_says_so(engines: Any) -> None:
    engine, clock = await engines()
    await engine.set_quota(Quota("keep", budget=Budget(4.0, 86400)))
    await engine.set_quota(Quota("stop", budget=Budget(4.0, 86400, stop_running=True)))
    kept, _ = await engine.allocate(request("keep/x", gpus=1), dry_run=False)
    stopped, _ = await engine.allocate(request("stop/x", gpus=1), dry_run=False)
    clock.advance(1800)
    await engine.committer.wait(engine.cost.tick())
    assert stopped.state == AllocationState.ALLOCATED  # half spent
    clock.advance(1800)
    await engine.committer.wait(engine.cost.tick())
    assert kept.state == AllocationState.ALLOCATED
    assert stopped.state == AllocationState.EXPIRED
    assert "budget of 'stop' is spent" in stopped.state_reason
    assert spent(engine, "stop/x") == pytest.approx(4.0)


async def test_budget_periods_reset_spend_and_alerts(engines: Any) -> None:
    engine, clock = await engines()
    seen: list[int] = []
    engine.cost.alert_observers.append(lambda a: seen.append(a.percent))
    await engine.set_quota(Quota("t", budget=Budget(6.0, 3600)))  # hourly periods
    await engine.allocate(request("t", gpus=1), dry_run=False)  # 4 an hour
    assert START % 3600 == 0
    for step in (3000, 600, 3000):
        clock.advance(step)
        await engine.committer.wait(engine.cost.tick())
    assert seen == [50, 50]  # once in each period
    assert engine.cost.usage("t", clock.now()) == (pytest.approx(10 / 3), pytest.approx(5 / 9))
    clock.advance(600)  # a new period with nothing charged in it yet
    assert engine.cost.usage("t", clock.now()) == (0.0, 0.0)


async def test_an_undecodable_cost_row_stops_the_start_with_one_line(tmp_path: Path) -> None:
    db = str(tmp_path / "bad.db")
    store = await Store.open(db)
    await store.commit(Write(puts=[(EventKind.COST, '["t", "H100", 0]', b"not json")]))
    engine = Engine(make_settings(tmp_path, db=db), store, ManualClock())
    with pytest.raises(StoreError, match="cannot be decoded") as failed:
        await engine.start()
    assert """stored cost '["t", "H100", 0]'""" in str(failed.value)
    await store.close()


@pytest.mark.parametrize("seed", range(4))
async def test_spend_does_not_depend_on_when_accrual_runs(engines: Any, seed: int) -> None:
    """Whatever the order of placements, releases, clock moves and accrual ticks, the
    ledger holds exactly each allocation's rate times the time it ran."""
    rng = random.Random(seed)
    engine, clock = await engines()
    running: list[Allocation] = []
    done: list[Allocation] = []
    for _ in range(60):
        op = rng.random()
        if op < 0.3:
            a, _ = await engine.allocate(
                request(rng.choice(["a", "b/c"]), gpus=rng.randint(0, 3)), False
            )
            if a.state == AllocationState.ALLOCATED:
                running.append(a)
        elif op < 0.45 and running:
            a = running.pop(rng.randrange(len(running)))
            await engine.release(a.id)
            done.append(a)
        elif op < 0.65:
            await engine.committer.wait(engine.cost.tick())
        else:
            clock.advance(rng.uniform(1, 20_000))  # crosses UTC days now and then
    await engine.committer.wait(engine.cost.tick())
    now = clock.now()
    expected = 0.0
    for a in running + done:
        assert a.allocate_time is not None
        end = a.end_time if a.end_time is not None else now
        expected += (end - a.allocate_time) / 3600 * a.shape.gpus * 4.0  # H100s only
    assert spent(engine) == pytest.approx(expected, rel=1e-9, abs=1e-9)
