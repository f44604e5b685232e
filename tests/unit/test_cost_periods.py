"""Calendar budget periods (day, ISO week, month, in UTC): the period arithmetic across
month and year ends and leap days, validation, and spend, alerts and refusals through the
engine on a fake clock, across a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rmgrpc import codec, cost
from rmgrpc.clock import ManualClock
from rmgrpc.cost import Period
from rmgrpc.engine import Engine
from rmgrpc.errors import InvalidArgument, QuotaExceeded
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationState, Budget, BudgetPeriod, Quota, Shape
from rmgrpc.services.quota import quota_from_request
from rmgrpc.store import Store
from rmgrpc.v1 import quota_pb2
from tests.conftest import make_settings

DAY, WEEK, MONTH = (Period(0, p) for p in (BudgetPeriod.DAY, BudgetPeriod.WEEK, BudgetPeriod.MONTH))


def at(text: str) -> float:
    """An ISO time (UTC) as seconds since the epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# -- the arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "t", "start", "end"),
    [
        (MONTH, "2027-01-31T23:59:59", "2027-01-01", "2027-02-01"),
        (MONTH, "2027-02-01T00:00:00", "2027-02-01", "2027-03-01"),
        (MONTH, "2027-02-28T12:00:00", "2027-02-01", "2027-03-01"),  # not a leap year
        (MONTH, "2028-02-29T12:00:00", "2028-02-01", "2028-03-01"),  # a leap year
        (MONTH, "2027-12-31T23:00:00", "2027-12-01", "2028-01-01"),
        (MONTH, "2028-01-01T00:00:00", "2028-01-01", "2028-02-01"),
        (WEEK, "2027-01-17T23:59:59", "2027-01-11", "2027-01-18"),  # Sunday
        (WEEK, "2027-01-18T00:00:00", "2027-01-18", "2027-01-25"),  # Monday
        (WEEK, "2027-12-31T10:00:00", "2027-12-27", "2028-01-03"),  # a week across years
        (DAY, "2028-02-29T23:00:00", "2028-02-29", "2028-03-01"),
    ],
)
def test_calendar_periods_start_and_end_where_a_calendar_says(
    period: Period, t: str, start: str, end: str
) -> None:
    first = period.start(at(t))
    assert first == at(start)
    assert period.end(first) == at(end)


@given(st.floats(0, 4e9))
def test_every_time_lies_in_one_calendar_period(t: float) -> None:
    for period in (DAY, WEEK, MONTH):
        start = period.start(t)
        end = period.end(start)
        assert start <= t < end
        assert period.start(end) == end  # the next period starts where this one ends
        d = datetime.fromtimestamp(start, UTC)
        assert (d.hour, d.minute, d.second) == (0, 0, 0)
        if period is WEEK:
            assert d.weekday() == 0  # Monday
        if period is MONTH:
            assert d.day == 1 and 28 * 86400 <= end - start <= 31 * 86400


@given(st.floats(1e9, 3e9), st.floats(0, 1e8))
def test_split_at_month_ends_covers_the_interval_once(start: float, length: float) -> None:
    pieces = list(cost.split(start, start + length, MONTH))
    assert sum(s for _, s in pieces) == pytest.approx(length, abs=1e-3)
    assert [p for p, _ in pieces] == sorted({p for p, _ in pieces})
    assert all(MONTH.start(p) == p for p, _ in pieces)


def test_a_budget_with_a_calendar_period_and_a_length_is_refused() -> None:
    msg = quota_pb2.Quota(
        tenant="org",
        budget=quota_pb2.Budget(
            amount=10, period_seconds=86400, period=quota_pb2.BUDGET_PERIOD_MONTH
        ),
    )
    with pytest.raises(InvalidArgument) as bad:
        quota_from_request(msg, {})
    assert [v.field for v in bad.value.violations] == ["quota.budget.period"]
    msg.budget.period = 9  # no such period
    with pytest.raises(InvalidArgument, match="unknown value 9"):
        quota_from_request(msg, {})
    msg.budget.period_seconds = 0
    msg.budget.period = quota_pb2.BUDGET_PERIOD_WEEK
    quota = quota_from_request(msg, {})
    assert quota.budget is not None and quota.budget.period == BudgetPeriod.WEEK
    # Stored and read back through the codec (as recovery reads it).
    again = codec.quota_from_proto(codec.quota_to_proto(quota))
    assert again.budget == quota.budget


# -- the engine ----------------------------------------------------------------------------


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[Engine, Store]] = []

    async def make(clock: ManualClock, db: str = ":memory:") -> Engine:
        settings = make_settings(tmp_path, db=db, gpu_hour_prices="H100=4.0")
        store = await Store.open(db)
        engine = Engine(settings, store, clock)
        await engine.start(simulated_nodes(2, 8, now=clock.now()))
        made.append((engine, store))
        return engine

    yield make
    for engine, store in made:
        if engine.store is store:
            await engine.stop()
            await store.close()


def one_gpu(tenant: str, **kw: Any) -> Allocation:
    return Allocation(id="", tenant=tenant, count=1, shape=Shape(gpus=1), **kw)


async def tick(engine: Engine) -> None:
    await engine.committer.wait(engine.cost.tick())


@pytest.mark.parametrize(
    "boundary",
    ["2027-02-01", "2027-03-01", "2028-03-01", "2028-01-01"],
    ids=["jan31-feb1", "feb28-mar1", "feb29-mar1-leap", "dec31-jan1"],
)
async def test_a_monthly_budget_resets_on_the_first(engines: Any, boundary: str) -> None:
    """Spent on the last evening of a month: refused until the 1st 00:00 UTC, then spend,
    alerts and refusals start afresh."""
    first = at(boundary)
    clock = ManualClock(first - 3 * 3600)  # 21:00 on the month's last day
    engine = await engines(clock)
    seen: list[tuple[int, float]] = []
    engine.cost.alert_observers.append(lambda a: seen.append((a.percent, a.spent)))
    await engine.set_quota(Quota("org", budget=Budget(10.0, period=BudgetPeriod.MONTH)))
    await engine.allocate(one_gpu("org/a"), dry_run=False)  # 4 an hour
    clock.advance(2.5 * 3600)
    await tick(engine)
    assert [p for p, _ in seen] == [50, 75, 90, 100]
    with pytest.raises(QuotaExceeded, match=r"is spent: 10.00 of 10.00 this month"):
        await engine.allocate(one_gpu("org/b"), dry_run=False)
    clock.advance(3600)  # 00:30 on the 1st: half an hour into the new month
    await tick(engine)
    assert engine.cost.usage("org", clock.now()) == (pytest.approx(2.0), pytest.approx(0.2))
    spend = engine.cost.budgets["org"]
    assert spend.period_start == first and spend.calendar == BudgetPeriod.MONTH
    b, _ = await engine.allocate(one_gpu("org/b"), dry_run=False)
    assert b.state == AllocationState.ALLOCATED
    clock.advance(1800)  # two GPUs for half an hour: 6 of 10 spent
    await tick(engine)
    assert [p for p, _ in seen] == [50, 75, 90, 100, 50]  # alerts re-armed in the new month


async def test_a_weekly_budget_resets_on_monday(engines: Any) -> None:
    clock = ManualClock(at("2027-01-17T21:00:00"))  # Sunday
    engine = await engines(clock)
    await engine.set_quota(Quota("t", budget=Budget(8.0, period=BudgetPeriod.WEEK)))
    await engine.allocate(one_gpu("t"), dry_run=False)
    clock.advance(2 * 3600)
    await tick(engine)
    with pytest.raises(QuotaExceeded, match="this week"):
        await engine.allocate(one_gpu("t"), dry_run=False)
    clock.advance(3660)  # Monday 00:01
    await tick(engine)
    assert engine.cost.budget_spend("t", clock.now()) == (pytest.approx(4 / 60), 8.0)


async def test_switching_between_a_length_and_a_calendar_period_starts_afresh(
    engines: Any,
) -> None:
    clock = ManualClock(at("2027-01-20T10:00:00"))
    engine = await engines(clock)
    await engine.set_quota(Quota("t", budget=Budget(100.0, 86400)))
    await engine.allocate(one_gpu("t"), dry_run=False)
    clock.advance(3600)
    await tick(engine)
    assert engine.cost.budget_spend("t", clock.now()) == (pytest.approx(4.0), 100.0)
    # The same day as a calendar day is still a new budget: it counts from now.
    await engine.set_quota(Quota("t", budget=Budget(100.0, period=BudgetPeriod.DAY)))
    assert engine.cost.budget_spend("t", clock.now()) == (0.0, 100.0)
    clock.advance(1800)
    await tick(engine)
    assert engine.cost.budget_spend("t", clock.now()) == (pytest.approx(2.0), 100.0)


async def test_a_monthly_budget_survives_a_restart_across_the_month_end(
    engines: Any, tmp_path: Path
) -> None:
    db = str(tmp_path / "periods.db")
    clock = ManualClock(at("2027-01-31T20:00:00"))
    engine = await engines(clock, db=db)
    await engine.set_quota(Quota("org", budget=Budget(10.0, period=BudgetPeriod.MONTH)))
    await engine.allocate(one_gpu("org/a"), dry_run=False)
    clock.advance(3 * 3600)  # 23:00: 12 spent
    await tick(engine)
    await engine.stop()
    await engine.store.close()

    again = await engines(clock, db=db)
    budget = again.state.quotas["org"].budget
    assert budget is not None and budget.period == BudgetPeriod.MONTH
    assert again.cost.budget_spend("org", clock.now()) == (pytest.approx(12.0), 10.0)
    with pytest.raises(QuotaExceeded, match="this month"):
        await again.allocate(one_gpu("org/b"), dry_run=False)
    clock.advance(2 * 3600)  # 01:00 on Feb 1: the stored spend was January's
    await tick(again)
    assert again.cost.budget_spend("org", clock.now()) == (pytest.approx(4.0), 10.0)
    b, _ = await again.allocate(one_gpu("org/b"), dry_run=False)
    assert b.state == AllocationState.ALLOCATED
