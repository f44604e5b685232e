"""Queued work re-checked against budgets: the pure core leaves pending work of a tenant
(or subtree) whose budget cannot cover it pending with the budget's reason (the rule
Allocate uses), and the engine starts it when a new period begins or the budget is
raised."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmgrpc import cost
from rmgrpc.clock import ManualClock
from rmgrpc.cost import BudgetLeft, Period, PriceTable
from rmgrpc.engine import Engine
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationState, Budget, BudgetPeriod, Quota, Shape
from rmgrpc.scheduler.cycle import dry_run, run_cycle
from rmgrpc.scheduler.estimate import estimate_starts
from rmgrpc.scheduler.reservations import when
from rmgrpc.scheduler.simulate import Simulator, make_node
from rmgrpc.scheduler.snapshot import Decisions, SchedulerConfig
from rmgrpc.store import Store
from tests.conftest import make_settings

PRICES = PriceTable({"H100": 4.0}, 4.0)
MONTH = Period(0, BudgetPeriod.MONTH)
NO_WAIT = SchedulerConfig(min_runtime_seconds=0, preemption_grace_seconds=0)


def cycle(s: Simulator, budgets: dict[str, BudgetLeft]) -> Decisions:
    return run_cycle(dataclasses.replace(s.snapshot(), budgets=budgets, prices=PRICES))


# -- the core ------------------------------------------------------------------------------


def test_pending_work_under_a_spent_budget_stays_pending_with_the_budgets_reason() -> None:
    s = Simulator([make_node("n1")], (), NO_WAIT)
    blocked = s.submit("org/a", Shape.of(1))
    other = s.submit("other", Shape.of(1))
    d = cycle(s, {"org": BudgetLeft(102.4, 100.0, MONTH)})
    assert [a.allocation_id for a in d.admissions] == [other.id]
    assert d.pending[blocked.id].reason == (
        "budget of 'org' is spent: 102.40 of 100.00 this month; "
        "starts with the next month or a raised budget"
    )
    # A new period (nothing spent in it) or a raised budget: it starts.
    for budgets in ({"org": BudgetLeft(0.0, 100.0, MONTH)}, {"org": BudgetLeft(102.4, 200.0)}):
        d = cycle(s, budgets)
        assert {a.allocation_id for a in d.admissions} == {blocked.id, other.id}


def test_a_hard_duration_must_fit_what_is_left() -> None:
    s = Simulator([make_node("n1")], (), NO_WAIT)
    # 2 H100 for 2 hours cost 16; 10 is left.
    long = s.submit("t", Shape.of(2), duration=7200)
    short = s.submit("t", Shape.of(2), duration=3600)  # 8: fits
    never = s.submit("t", Shape.of(2))  # no duration: runs while anything is left
    d = cycle(s, {"t": BudgetLeft(90.0, 100.0, Period(86400))})
    assert {a.allocation_id for a in d.admissions} == {short.id, never.id}
    assert d.pending[long.id].reason == (
        "budget of 't' cannot cover this request: it may cost 16.00 over "
        "max_duration_seconds 7200, and 10.00 of 100.00 is left this period; "
        "starts with the next period or a raised budget"
    )


# -- estimates -----------------------------------------------------------------------------


def test_budget_held_work_is_estimated_at_its_next_period_and_takes_no_one_elses_turn() -> None:
    """The estimate replay starts no budget-held work: its estimate is the next period's
    start (never the first hard end), and what queues behind it is estimated as if it
    were not there, as the passes will place it."""
    s = Simulator([make_node("n1", gpus=2)], (), NO_WAIT)
    running = s.submit("other", Shape.of(2), duration=600)
    s.step()
    assert s.allocations[running.id].state == AllocationState.ALLOCATED
    held = s.submit("org/a", Shape.of(2), duration=600)
    behind = s.submit("other", Shape.of(2), duration=600)
    snap = dataclasses.replace(
        s.snapshot(), budgets={"org": BudgetLeft(100.0, 100.0, MONTH)}, prices=PRICES
    )
    got = estimate_starts(snap, run_cycle(snap), 100)
    month_end = MONTH.end(MONTH.start(s.now))
    assert got[held.id].start_time == month_end
    assert got[held.id].reason.startswith(f"not before {when(month_end)}, when the budget")
    assert "budget of 'org' cannot cover" in got[held.id].reason
    # Behind it: the first hard end, not the end of the held work's imagined run.
    assert got[behind.id].start_time == s.now + 600


@pytest.mark.parametrize(
    ("left", "words"),
    [
        (BudgetLeft(5.0, 5.0, Period()), "a new period would not cover it"),
        # 2 H100 for 2 h cost 16: more than the whole daily budget of 10.
        (BudgetLeft(1.0, 10.0, Period(86400)), "a new period would not cover it"),
    ],
)
def test_budget_held_work_that_no_new_period_frees_is_unknown(left: BudgetLeft, words: str) -> None:
    s = Simulator([make_node("n1")], (), NO_WAIT)
    a = s.submit("t", Shape.of(2), duration=7200)
    snap = dataclasses.replace(s.snapshot(), budgets={"t": left}, prices=PRICES)
    got = estimate_starts(snap, run_cycle(snap), 100)
    assert got[a.id].start_time is None
    assert got[a.id].reason.startswith("unknown: budget of 't'")
    assert words in got[a.id].reason


def test_a_request_held_by_two_budgets_waits_for_the_later_period() -> None:
    s = Simulator([make_node("n1")], (), NO_WAIT)
    a = s.submit("org/a", Shape.of(1), duration=60)
    day = Period(86400)
    budgets = {"org": BudgetLeft(10.0, 10.0, MONTH), "org/a": BudgetLeft(3.0, 3.0, day)}
    snap = dataclasses.replace(s.snapshot(), budgets=budgets, prices=PRICES)
    got = estimate_starts(snap, run_cycle(snap), 100)
    later = max(MONTH.end(MONTH.start(s.now)), day.end(day.start(s.now)))
    assert got[a.id].start_time == later


def test_a_budget_that_never_resets_waits_for_a_raise_and_dry_runs_say_so() -> None:
    s = Simulator([make_node("n1")], (), NO_WAIT)
    probe = Allocation(id="", tenant="t/x", count=1, shape=Shape.of(1))
    snap = dataclasses.replace(
        s.snapshot(), budgets={"t": BudgetLeft(5.0, 5.0, Period())}, prices=PRICES
    )
    got = dry_run(snap, probe)
    assert not got.placements
    assert got.reason.endswith("5.00 of 5.00 in total; starts with a raised budget")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "a/x", "a/y", "b"]),
            st.integers(0, 4),
            st.sampled_from([0, 600, 3600, 36000]),
        ),
        min_size=1,
        max_size=12,
    ),
    st.dictionaries(
        st.sampled_from(["a", "a/x", "b"]),
        st.tuples(st.floats(0, 60), st.floats(0.5, 50)),
        max_size=3,
    ),
)
def test_no_pass_starts_work_a_budget_refuses(
    requests: list[tuple[str, int, int]], spend: dict[str, tuple[float, float]]
) -> None:
    """Whatever the queue and budgets: nothing admitted is refused by the Allocate rule,
    and everything that rule refuses is pending with its budget's reason."""
    s = Simulator([make_node("n1"), make_node("n2")], (), NO_WAIT)
    queued = [
        s.submit(tenant, Shape.of(gpus), duration=duration) for tenant, gpus, duration in requests
    ]
    budgets = {t: BudgetLeft(spent, amount, Period(86400)) for t, (spent, amount) in spend.items()}
    d = cycle(s, budgets)
    admitted = {a.allocation_id for a in d.admissions}
    for a in queued:
        block = cost.budget_block(a, budgets, PRICES)
        if block is None:
            continue
        assert a.id not in admitted
        assert d.pending[a.id].reason.startswith(block[1])


# -- the engine ----------------------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, ManualClock]]:
    # 23:00 UTC on Jan 31: an hour before the month ends.
    clock = ManualClock(datetime(2027, 1, 31, 23, tzinfo=UTC).timestamp())
    store = await Store.open(":memory:")
    e = Engine(make_settings(tmp_path, db=":memory:", gpu_hour_prices="H100=4.0"), store, clock)
    await e.start(simulated_nodes(1, 8, now=clock.now()))
    yield e, clock
    await e.stop()
    await store.close()


def gpus(tenant: str, n: int, **kw: Any) -> Allocation:
    return Allocation(id="", tenant=tenant, count=1, shape=Shape(gpus=n), **kw)


async def test_queued_work_waits_once_its_budget_is_spent_and_starts_next_month(
    engine: tuple[Engine, ManualClock],
) -> None:
    e, clock = engine
    await e.set_quota(Quota("org", budget=Budget(12.0, period=BudgetPeriod.MONTH)))
    running, _ = await e.allocate(gpus("org/a", 4), dry_run=False)  # 16 an hour
    filler, _ = await e.allocate(gpus("other", 4), dry_run=False)
    queued, _ = await e.allocate(gpus("org/b", 2), dry_run=False)  # the node is full
    assert queued.state == AllocationState.PENDING
    clock.advance(1800)  # 23:30: 8 of 12 spent
    await e.committer.wait(e.cost.tick())
    await e.release(filler.id)
    await e.scheduling.run_now()
    assert queued.state == AllocationState.ALLOCATED  # budget left: it starts
    await e.release(queued.id)
    late, _ = await e.allocate(gpus("org/c", 8), dry_run=False)  # waits for org/a's GPUs
    assert late.state == AllocationState.PENDING
    clock.advance(1200)  # 23:50: 13.33 of 12 spent
    epoch = e.scheduling.epoch
    await e.committer.wait(e.cost.tick())
    assert e.scheduling.epoch == epoch  # the same month: the tick asks for no pass
    await e.release(running.id)
    await e.scheduling.run_now()
    assert late.state == AllocationState.PENDING
    assert late.pending_reason.startswith("budget of 'org' is spent: 13.33 of 12.00 this month")
    clock.advance(600)  # 00:00 Feb 1: the tick sees the new month and asks for a pass
    epoch = e.scheduling.epoch
    await e.committer.wait(e.cost.tick())
    assert e.scheduling.epoch > epoch  # the queue is no longer settled
    await e.scheduling.run_now()
    assert late.state == AllocationState.ALLOCATED


async def test_raising_the_budget_starts_queued_work(engine: tuple[Engine, ManualClock]) -> None:
    e, clock = engine
    await e.set_quota(Quota("t", budget=Budget(4.0, 0)))
    running, _ = await e.allocate(gpus("t", 8), dry_run=False)  # 32 an hour
    queued, _ = await e.allocate(gpus("t", 1), dry_run=False)
    clock.advance(900)
    await e.committer.wait(e.cost.tick())
    await e.release(running.id)
    await e.scheduling.run_now()
    assert queued.state == AllocationState.PENDING
    assert queued.pending_reason.endswith("in total; starts with a raised budget")
    await e.set_quota(Quota("t", budget=Budget(100.0, 0)))
    await e.scheduling.run_now()
    assert queued.state == AllocationState.ALLOCATED
